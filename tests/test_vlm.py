"""``owlore.vision.llava``: the LLaVA builder keeps the language model's weights, encodes VQA examples with labels on the answer
only, saves and reloads to the same logits, works with ``VisualTokenPruner`` unchanged, and learns from images."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "fixtures"))
import eval_support  # noqa: E402
import method_support as ms  # noqa: E402

from owlore.data.fashion_vqa import build_vqa  # noqa: E402
from owlore.vision.llava import IMAGE_TOKEN, VisionTowerConfig, build_llava, collate, encode_example  # noqa: E402

TOWER = VisionTowerConfig(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2)


@pytest.fixture
def parts():
    lm = ms.tiny_model(2)
    reference = lm(torch.tensor([[3, 4, 5, 6]])).logits
    model, tok = build_llava(lm, eval_support.tokenizer(), TOWER)
    rng = np.random.default_rng(0)
    examples = build_vqa(rng.integers(0, 256, (40, 28, 28), dtype=np.uint8), np.arange(40) % 10, 4)
    return model.eval(), tok, examples, reference


def _batch(tok, examples):
    return collate([encode_example(tok, e, TOWER.num_tokens) for e in examples], tok.pad_token_id)


def test_language_model_weights_carry_over(parts):
    model, tok, _, reference = parts
    assert TOWER.num_tokens == 144
    with torch.no_grad():
        assert torch.equal(model(input_ids=torch.tensor([[3, 4, 5, 6]])).logits, reference)
    assert tok.convert_tokens_to_ids(IMAGE_TOKEN) == model.config.image_token_id


def test_labels_cover_only_the_answer(parts):
    _, tok, examples, _ = parts
    f = encode_example(tok, examples[0], TOWER.num_tokens)
    answer = [t for t, lab in zip(f["input_ids"], f["labels"]) if lab != -100]
    assert tok.decode(answer).strip() == examples[0].answer + tok.eos_token
    assert f["input_ids"].count(tok.convert_tokens_to_ids(IMAGE_TOKEN)) == TOWER.num_tokens
    b = _batch(tok, examples)
    assert b["pixel_values"].shape == (4, 3, 84, 84) and -1 <= b["pixel_values"].min() <= b["pixel_values"].max() <= 1
    assert (b["attention_mask"].sum(1) == torch.tensor([len(encode_example(tok, e, 144)["input_ids"])
                                                        for e in examples])).all()


def test_follow_up_turns_are_labelled_and_the_first_turn_is_the_eval_prompt(parts):
    _, tok, _, _ = parts
    rng = np.random.default_rng(1)
    images, labels = rng.integers(0, 256, (40, 28, 28), dtype=np.uint8), np.arange(40) % 10
    single = encode_example(tok, build_vqa(images, labels, 1)[0], TOWER.num_tokens)
    example = build_vqa(images, labels, 1, questions=4)[0]
    f = encode_example(tok, example, TOWER.num_tokens)
    first = len(single["input_ids"]) - 1  # the single-question features up to (not including) the eos
    assert f["input_ids"][:first] == single["input_ids"][:first]
    assert f["labels"][:first] == single["labels"][:first]
    answers = [example.answer, *(a for _, a, _ in example.follow_ups)]
    labelled = [t for t, lab in zip(f["input_ids"], f["labels"]) if lab != -100]
    expected = [t for a in answers for t in tok(" " + a, add_special_tokens=False)["input_ids"]] + [tok.eos_token_id]
    assert labelled == expected
    assert tok.decode(f["input_ids"]).count("Question:") == len(answers) == 4


def test_chunked_loss_reproduces_the_llava_loss_and_gradients(parts):
    from owlore.memory.chunked_loss import disable_chunked_loss, enable_chunked_loss

    model, tok, examples, _ = parts
    model.train()
    b = _batch(tok, examples)
    weight = model.model.multi_modal_projector.linear_1.weight

    def loss_and_grad():
        model.zero_grad()
        loss = model(**b).loss
        loss.backward()
        return loss.detach(), weight.grad.clone()

    reference = loss_and_grad()
    enable_chunked_loss(model, 5)
    try:
        chunked = loss_and_grad()
    finally:
        disable_chunked_loss(model)
    torch.testing.assert_close(chunked[0], reference[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(chunked[1], reference[1], rtol=1e-4, atol=1e-6)


def test_save_and_load_give_the_same_logits(parts, tmp_path):
    from transformers import LlavaForConditionalGeneration

    model, tok, examples, _ = parts
    b = _batch(tok, examples)
    with torch.no_grad():
        before = model(**b).logits
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded = LlavaForConditionalGeneration.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(**b).logits, before)


def test_the_pruner_works_on_it_unchanged(parts):
    from owlore.pruning import VisualTokenPruner

    model, tok, examples, _ = parts
    b = _batch(tok, examples[:2])
    inputs = {k: b[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    real = inputs["attention_mask"].bool()  # right padding: logits at padded positions mean nothing
    with torch.no_grad():
        reference = model(**inputs).logits
        for method in ("zoo", "random"):
            kept_all = VisualTokenPruner(method, TOWER.num_tokens).prepare(model, **inputs)
            assert torch.equal(model(**kept_all).logits[real], reference[real])
            ninth = VisualTokenPruner(method, 16).prepare(model, **inputs)
            assert ninth["input_ids"].shape[1] == inputs["input_ids"].shape[1] - (TOWER.num_tokens - 16)
            assert model(**ninth).logits.shape[1] == ninth["input_ids"].shape[1]


def test_the_vision_tower_learns(parts):
    model, tok, examples, _ = parts
    model.train()
    b = _batch(tok, examples)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        loss = model(**b).loss
        loss.backward()
        assert model.model.vision_tower.embeddings.patch_embedding.weight.grad.abs().sum() > 0
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def _idx_dir(root: Path) -> Path:
    import gzip

    rng = np.random.default_rng(2)
    for split, n in (("train", 64), ("t10k", 32)):
        for kind, arr in (("images-idx3", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)),
                          ("labels-idx1", (np.arange(n) % 10).astype(np.uint8))):
            header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
            (root / f"{split}-{kind}-ubyte.gz").write_bytes(gzip.compress(header + arr.tobytes()))
    return root


VISION = ["vision.enabled=true", "data.train=fashion-vqa", "vision.train_examples=16", "vision.hidden_size=32",
          "vision.intermediate_size=64", "vision.num_layers=1", "vision.num_heads=2"]


@pytest.mark.parametrize("method", ["full", "owlore"])
def test_train_py_trains_a_llava_that_reloads(method, tmp_path):
    """train.py with a vision section: the tower trains (from scratch) with the method, the saved model reloads as
    a stock LlavaForConditionalGeneration; under owlore only the sampled decoder layers change."""
    import json

    from transformers import LlavaForConditionalGeneration

    import train

    lm_dir = ms.save_checkpoint(tmp_path / "lm", num_layers=4)
    data = _idx_dir(tmp_path)
    out = tmp_path / "out"
    argv = ms.train_argv(method, lm_dir, tmp_path / "unused.jsonl", out, *VISION, f"vision.data_dir={data}",
                         "data.max_seq_length=512", "training.learning_rate=1e-3")
    summary = train.main(argv)
    assert len(summary["log_losses"]) == 3
    model = LlavaForConditionalGeneration.from_pretrained(out / "final")
    saved = model.state_dict()
    assert model.config.vision_config.patch_size == 7 and model.config.image_token_id is not None
    torch.manual_seed(0)  # the same seed build_llava used: the tower's initial weights
    fresh, _ = build_llava(ms.tiny_model(4), eval_support.tokenizer(), VisionTowerConfig(
        hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2))
    start = fresh.state_dict()
    key = "model.vision_tower.embeddings.patch_embedding.weight"
    assert not torch.equal(saved[key], start[key])  # the tower trained
    if method == "owlore":
        record = json.loads((out / "owlore_record.json").read_text())
        trained = {i for h in record["history"] for i in h["layers"]}
        for i in range(4):
            k = f"model.language_model.layers.{i}.mlp.down_proj.weight"
            assert torch.equal(saved[k], start[k]) == (i not in trained)


def test_vision_config_refusals():
    from owlore.run.config import ConfigError
    from owlore.run.recipe import load_config

    base = [*VISION, "training.output_dir=x"]
    with pytest.raises(ConfigError, match="vision.enabled=true with method lora: the from-scratch vision tower"):
        load_config(ms.ROOT / "configs/smollm2_lora.yaml", base)
    with pytest.raises(ConfigError, match="data.train='demo' with vision.enabled=true"):
        load_config(ms.ROOT / "configs/smollm2_full.yaml", [*base, "data.train=demo"])
    with pytest.raises(ConfigError, match="vision.freeze_language_model=true with method owlore"):
        load_config(ms.ROOT / "configs/smollm2_owlore.yaml", [*base, "vision.freeze_language_model=true"])
    with pytest.raises(ConfigError, match="vision.patch_size=5: must divide image_size=84"):
        load_config(ms.ROOT / "configs/smollm2_full.yaml", [*base, "vision.patch_size=5"])


def _reference_choices(model, tok, examples, *, first_token: bool):
    """Naive oracle: one unbatched forward per example and candidate, no padding."""
    from owlore.data.fashion_vqa import CHOICES
    from owlore.vision.llava import pixel_values, prompt_ids

    out = []
    with torch.no_grad():
        for e in examples:
            prompt = prompt_ids(tok, e.question, TOWER.num_tokens)
            px = pixel_values([e.image])
            scores = {}
            for w in CHOICES[e.kind]:
                ans = tok(" " + w, add_special_tokens=False)["input_ids"]
                ids = torch.tensor([prompt + (ans[:1] if first_token else ans)])
                logp = model(input_ids=ids, pixel_values=px).logits.log_softmax(-1)[0]
                n = 1 if first_token else len(ans)
                scores[w] = float(sum(logp[len(prompt) - 1 + k, ids[0, len(prompt) + k]] for k in range(n)))
            out.append(max(scores, key=scores.get))
    return out


def test_accuracy_matches_a_naive_loop_and_keep_all_pruning(parts):
    from owlore.data.fashion_vqa import as_records
    from owlore.pruning import VisualTokenPruner
    from owlore.pruning.accuracy import vqa_accuracy
    from owlore.vision.llava import llava_processor

    model, tok, _, _ = parts
    rng = np.random.default_rng(5)
    examples = build_vqa(rng.integers(0, 256, (40, 28, 28), dtype=np.uint8), np.arange(40) % 10, 9)
    res = vqa_accuracy(model, llava_processor(model.config, tok), as_records(examples), batch_size=4)
    assert res["scoring"] == "full"  # this tokenizer's candidates share first tokens
    assert res["predictions"] == _reference_choices(model, tok, examples, first_token=False)
    assert res["accuracy"] == sum(c == e.answer for c, e in zip(res["predictions"], examples)) / 9
    kept = vqa_accuracy(model, llava_processor(model.config, tok), as_records(examples), batch_size=4,
                        pruner=VisualTokenPruner("zoo", TOWER.num_tokens))
    assert kept["predictions"] == res["predictions"]
    pruned = vqa_accuracy(model, llava_processor(model.config, tok), as_records(examples), batch_size=4,
                          pruner=VisualTokenPruner("random", 16))
    assert pruned["n"] == 9 and set(pruned["by_kind"]) <= {"position", "presence", "count"}


@pytest.mark.slow
def test_first_token_scoring_with_smollm2s_tokenizer(smollm2_path):
    """SmolLM2's tokenizer gives every candidate of a kind its own first token: one pass per batch, same choices
    as the naive loop."""
    from transformers import AutoTokenizer

    from owlore.data.fashion_vqa import as_records
    from owlore.pruning.accuracy import vqa_accuracy
    from owlore.vision.llava import llava_processor

    tok = AutoTokenizer.from_pretrained(smollm2_path)
    model, tok = build_llava(ms.tiny_model(2), tok, TOWER)
    model.eval()
    rng = np.random.default_rng(6)
    examples = build_vqa(rng.integers(0, 256, (40, 28, 28), dtype=np.uint8), np.arange(40) % 10, 9)
    res = vqa_accuracy(model, llava_processor(model.config, tok), as_records(examples), batch_size=4,
                       scoring="first-token")
    assert res["scoring"] == "first-token"
    assert res["predictions"] == _reference_choices(model, tok, examples, first_token=True)


def test_aligned_training_then_pruning_accuracy_end_to_end(tmp_path):
    """train.py with vision.align_steps (the alignment stage runs and is recorded) and pruning on, then
    ``eval/vlm_pruning.py accuracy`` on the saved model: every method and budget scored, files written, keeping
    every token scores exactly as the unpruned model."""
    import json

    from transformers import AutoProcessor, LlavaForConditionalGeneration

    import train
    from owlore.data.fashion_vqa import as_records, heldout_examples, write_heldout_dir
    from owlore.pruning import VisualTokenPruner
    from owlore.pruning.accuracy import vqa_accuracy

    lm_dir = ms.save_checkpoint(tmp_path / "lm", num_layers=2)
    data = _idx_dir(tmp_path)
    out = tmp_path / "out"
    argv = ms.train_argv("full", lm_dir, tmp_path / "unused.jsonl", out, *VISION, f"vision.data_dir={data}",
                         "vision.align_steps=3", "vision.align_batch_size=4", "data.max_seq_length=512",
                         "pruning.method=cls", "pruning.keep=16", "vision.eval_examples=6")
    summary = train.main(argv)
    assert summary["training_pruning"] == {"method": "cls", "keep": 16}
    assert summary["vision_alignment"]["steps"] == 3 and summary["vision_alignment"]["rescale"] > 0
    assert 0 <= summary["vision_alignment"]["heldout_token_accuracy"] <= 1

    assert (out / "final" / "processor_config.json").is_file()  # saved with the model
    heldout = write_heldout_dir(tmp_path / "heldout", 6, data_dir=data)  # the benchmark as a user's VQA directory
    script = eval_support.load_script("vlm_pruning")
    res_dir = tmp_path / "acc"
    methods = ["random", "cls", "zoo_exact", "divprune", "fopru_rank", "cdpruner", "visionzip", "fastv", "dart"]
    result = script.run_accuracy(script.build_parser().parse_args(
        ["accuracy", "--model", str(out / "final"), "--out", str(res_dir), "--data", str(heldout), "--limit", "6",
         "--budgets", "144", "16", "4", "--batch", "8", "--scoring", "first-token", "--repeats", "1", "--draw", "2", "--llm-layer", "1",
         "--methods", *methods]))
    rows = result["rows"]
    assert [(r["method"], r["tokens"]) for r in rows] == [("none", 144)] + [(m, k) for k in (144, 16, 4)
                                                                            for m in methods]
    base = rows[0]
    assert base["retention"] == 1.0 and base["n"] == 6
    assert summary["eval_after"]["vqa"]["average"] == base["accuracy"]  # train.py scores the same questions
    for r in rows[1:1 + len(methods)]:  # keep = N: no pruning, the unpruned accuracy
        assert r["accuracy"] == base["accuracy"] and r["prompt_tokens"] == base["prompt_tokens"]
    for r in rows[1 + len(methods):]:
        in_llm = r["method"] in ("fastv", "dart")  # the prompt stays whole; layers >= K see the short one
        assert r["prompt_tokens"] == base["prompt_tokens"] - (0 if in_llm else 144 - r["tokens"])
        assert r["prefill_gflops"] < base["prefill_gflops"]
    for name in ("accuracy.json", "accuracy.md"):
        assert (res_dir / name).stat().st_size > 0
    for name in ("accuracy.png", "accuracy_by_kind.png", "kept_tokens.png"):
        eval_support.assert_plot(res_dir / name)
    assert json.loads((res_dir / "accuracy.json").read_text())["rows"][0]["method"] == "none"
    # the table's figure for one method equals a direct evaluation with that pruner
    model = LlavaForConditionalGeneration.from_pretrained(out / "final").eval()
    processor = AutoProcessor.from_pretrained(out / "final")
    examples = heldout_examples(6, grid=3, seed=0, data_dir=data)
    direct = vqa_accuracy(model, processor, as_records(examples), pruner=VisualTokenPruner("cls", 16), batch_size=4)
    assert direct["accuracy"] == next(r["accuracy"] for r in rows if r["method"] == "cls" and r["tokens"] == 16)
