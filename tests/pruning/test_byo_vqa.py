"""Bring your own images: a folder of images + questions.jsonl scored by every method and budget through the model's
own processor; choice rows by log-likelihood, answer rows by greedy generation, both equal to naive unbatched loops;
bad rows named by line before any model loads."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "fixtures"))
import eval_support  # noqa: E402
import method_support as ms  # noqa: E402

from owlore.data.vqa_files import VQARecord, load_image, read_vqa_dir, write_vqa_dir  # noqa: E402
from owlore.errors import UsageError  # noqa: E402
from owlore.vision.llava import VisionTowerConfig, build_llava, llava_processor  # noqa: E402

TOWER = VisionTowerConfig(image_size=28, patch_size=7, hidden_size=32, intermediate_size=64, num_layers=2,
                          num_heads=2)  # 16 visual tokens
COLORS = ["a", "b", "c"]  # one token each with the fixture tokenizer: the one-pass path


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory):
    """A tiny LLaVA saved with its processor, as train.py writes one."""
    path = tmp_path_factory.mktemp("vlm")
    model, tok = build_llava(ms.tiny_model(2), eval_support.tokenizer(), TOWER)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    llava_processor(model.config, tok).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def user_data(tmp_path_factory):
    """Real-looking user data: RGB images of different sizes and formats, choice rows and free-answer rows."""
    from PIL import Image

    path = tmp_path_factory.mktemp("data")
    (path / "pics").mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i, (w, h) in enumerate([(40, 30), (28, 28), (64, 48), (30, 50), (28, 40), (56, 56)]):
        name = f"pics/{i}.{'png' if i % 2 else 'jpg'}"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path / name)
        if i < 2:
            rows.append({"image": name, "question": "Which letter?", "choices": COLORS,
                         "answer": COLORS[i % 3], "kind": "color"})
        elif i == 2:  # choices sharing their first token: scored by full log-likelihood
            rows.append({"image": name, "question": "Which one?", "choices": ["red car", "red bus", "blue bus"],
                         "answer": "red bus", "kind": "color"})
        else:
            rows.append({"image": name, "question": "Describe it.", "answer": "red", "kind": "caption"})
    (path / "questions.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_every_bad_row_is_named_by_line_before_anything_loads(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    lines = ['{"image": "a.png", "question": "q?", "answer": "x"}', "not json",
             '{"image": "a.png", "answer": "x"}',
             '{"image": "a.png", "question": "q?", "choices": ["x", "y"], "answer": "z"}',
             '{"image": "missing.png", "question": "q?", "answer": "x"}',
             '{"image": "a.png", "question": "q?", "answer": "x", "colour": 1}']
    (tmp_path / "questions.jsonl").write_text("\n".join(lines))
    with pytest.raises(UsageError) as e:
        read_vqa_dir(tmp_path)
    text = str(e.value)
    for needle in ("5 bad row(s)", "line 2: not JSON", "line 3: 'question'", "line 4: 'answer' 'z' is not one of",
                   "line 5: image 'missing.png' not found", "line 6: unknown field 'colour'"):
        assert needle in text
    assert "line 1" not in text
    with pytest.raises(UsageError, match="no questions.jsonl"):
        read_vqa_dir(tmp_path / "nowhere")


def test_write_then_read_keeps_every_field_and_pixel(tmp_path):
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (12, 12), dtype=np.uint8) for _ in range(3)]
    records = [VQARecord(image=images[0], question="Is it?", answer="yes", choices=("yes", "no"), kind="presence"),
               VQARecord(image=images[1], question="Name it.", answer="boot", kind="free"),
               VQARecord(image=images[2], question="How many?", answer="two", choices=("one", "two"), kind="count")]
    back = read_vqa_dir(write_vqa_dir(tmp_path, records))
    assert [(r.question, r.answer, r.choices, r.kind) for r in back] == [
        (r.question, r.answer, r.choices, r.kind) for r in records]
    for r, img in zip(back, images):
        assert np.array_equal(np.asarray(load_image(r.image))[..., 0], img)


def _naive_predictions(model, processor, records):
    """One unbatched, unpadded pass per row and choice; greedy decoding by hand, one token per step on the cache
    (a random model may emit the image token, which an uncached loop would read as a new placeholder)."""
    from owlore.evaluation.answers import first_line
    from owlore.pruning.vlm_inputs import Prompter

    prompter = Prompter(processor)
    out = []
    with torch.no_grad():
        for r in records:
            prompt = prompter.prompt(r.question)
            enc = dict(processor(text=[prompt], images=[load_image(r.image)], return_tensors="pt",
                                 add_special_tokens=False))
            ids, extra = enc.pop("input_ids"), {k: v for k, v in enc.items() if k != "attention_mask"}
            if r.choices:
                scores = {}
                for c in r.choices:
                    ans = prompter.answer_ids(prompt, c)
                    full = torch.cat([ids, torch.tensor([ans])], 1)
                    logp = model(input_ids=full, **extra).logits.log_softmax(-1)[0]
                    scores[c] = float(sum(logp[ids.shape[1] - 1 + t, a] for t, a in enumerate(ans)))
                out.append(max(scores, key=scores.get))
            else:
                new = []
                step = model(input_ids=ids, use_cache=True, **extra)  # then one token at a time on the cache
                for _ in range(16):
                    nxt = int(step.logits[0, -1].argmax())
                    if nxt == processor.tokenizer.eos_token_id:
                        break
                    new.append(nxt)
                    step = model(input_ids=torch.tensor([[nxt]]), past_key_values=step.past_key_values,
                                 use_cache=True)
                out.append(first_line(processor.tokenizer.decode(new, skip_special_tokens=True)))
    return out


def test_accuracy_on_a_users_folder_matches_naive_loops(vlm_dir, user_data, tmp_path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from owlore.pruning.accuracy import vqa_accuracy

    script = eval_support.load_script("vlm_pruning")
    methods = ["random", "holov", "mmtok", "vscan", "cdpruner", "fastv"]
    result = script.run_accuracy(script.build_parser().parse_args(
        ["accuracy", "--model", str(vlm_dir), "--data", str(user_data), "--out", str(tmp_path), "--budgets", "16",
         "4", "--batch", "2", "--repeats", "1", "--draw", "2", "--llm-layer", "1", "--methods", *methods]))
    rows = result["rows"]
    assert result["visual_tokens"] == 16 and result["examples"] == 6
    assert [(r["method"], r["tokens"]) for r in rows] == [("none", 16)] + [(m, k) for k in (16, 4) for m in methods]
    base = rows[0]
    assert set(base["by_kind"]) == {"caption", "color"} and base["kind_n"] == {"caption": 3, "color": 3}
    assert set(base["scoring"].split("+")) == {"first-token", "full", "generate"}  # batches of 2: each path once
    assert 0.0 <= base["f1"] <= 1.0
    for r in rows[1:1 + len(methods)]:  # keep every token: exactly the unpruned scores
        assert r["by_kind"] == base["by_kind"] and r["prompt_tokens"] == base["prompt_tokens"]
    for name in ("accuracy.png", "accuracy_by_kind.png", "kept_tokens.png"):
        eval_support.assert_plot(tmp_path / name)
    md = (tmp_path / "accuracy.md").read_text()
    assert "**caption** (3 questions" in md and "**color** (3 questions" in md
    # the unpruned predictions are the naive loops' (batched, padded scoring changes nothing)
    model = LlavaForConditionalGeneration.from_pretrained(vlm_dir).eval()
    processor = AutoProcessor.from_pretrained(vlm_dir)
    records = read_vqa_dir(user_data)
    direct = vqa_accuracy(model, processor, records, batch_size=2)
    assert direct["predictions"] == _naive_predictions(model, processor, records)
    assert direct["by_kind"]["color"]["accuracy"] == base["by_kind"]["color"]


@pytest.fixture(scope="module")
def next_dir(tmp_path_factory):
    """A tiny LLaVA-NeXT (anyres: 1 + 2 or 4 tiles of 16 tokens, newline tokens) with its processor."""
    import transformers

    path = tmp_path_factory.mktemp("next")
    tok = eval_support.tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    pinpoints = [[32, 64], [64, 32], [64, 64]]
    config = transformers.LlavaNextConfig(
        vision_config=transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                    num_attention_heads=4, image_size=32, patch_size=8),
        text_config=transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tok),
                                             max_position_embeddings=512),
        image_token_id=tok.convert_tokens_to_ids("<image>"), image_grid_pinpoints=pinpoints)
    torch.manual_seed(0)
    transformers.LlavaNextForConditionalGeneration(config).save_pretrained(path)
    images = transformers.LlavaNextImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                                     image_grid_pinpoints=pinpoints, image_mean=[0.5] * 3,
                                                     image_std=[0.5] * 3)
    template = ("{% for m in messages %}{% for c in m['content'] %}{% if c['type'] == 'image' %}{{ '<image>' }}"
                "{% else %}{{ '\\nQ: ' + c['text'] }}{% endif %}{% endfor %}{% endfor %}{{ '\\nA:' }}")
    transformers.LlavaNextProcessor(image_processor=images, tokenizer=tok, patch_size=8,
                                    vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                    image_token="<image>", chat_template=template).save_pretrained(path)
    return path


def test_a_llava_next_model_runs_the_same_evaluation(next_dir, user_data, tmp_path):
    """Any supported family through its own processor: images of different shapes get different token counts, so
    budgets default to ratios (per crop) and only measured times are reported."""
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    from owlore.pruning.accuracy import vqa_accuracy

    script = eval_support.load_script("vlm_pruning")
    methods = ["random", "holov", "mmtok", "vscan", "zoo_exact"]
    result = script.run_accuracy(script.build_parser().parse_args(
        ["accuracy", "--model", str(next_dir), "--data", str(user_data), "--out", str(tmp_path), "--batch", "2",
         "--repeats", "1", "--methods", *methods]))
    rows = result["rows"]
    assert [r["tokens"] for r in rows[1:6]] == [0.5] * 5 and rows[-1]["tokens"] == pytest.approx(1 / 36)
    assert all(r["prefill_gflops"] is None for r in rows) and rows[0]["by_kind"].keys() == {"caption", "color"}
    assert all(r["prompt_tokens"] < rows[0]["prompt_tokens"] for r in rows[1:])
    eval_support.assert_plot(tmp_path / "accuracy_by_kind.png")
    model = LlavaNextForConditionalGeneration.from_pretrained(next_dir).eval()
    processor = AutoProcessor.from_pretrained(next_dir)
    records = read_vqa_dir(user_data)
    assert vqa_accuracy(model, processor, records, batch_size=2)["predictions"] == _naive_predictions(
        model, processor, records)


def test_a_prompt_template_replaces_the_chat_template(vlm_dir, user_data):
    from transformers import AutoProcessor

    from owlore.pruning.vlm_inputs import Prompter

    processor = AutoProcessor.from_pretrained(vlm_dir)
    prompter = Prompter(processor, "<image>\nQ: {question}\nA:")
    assert prompter.prompt("Why?") == "<image>\nQ: Why?\nA:"
    enc = prompter.batch([prompter.prompt("Why?")], [load_image(read_vqa_dir(user_data)[0].image)])
    assert int((enc["input_ids"] == processor.tokenizer.convert_tokens_to_ids("<image>")).sum()) == 16
    with pytest.raises(UsageError, match=r"\{question\}"):
        Prompter(processor, "no placeholder")


def test_a_model_the_pruner_cannot_run_is_refused_before_its_weights_load(tmp_path, user_data):
    script = eval_support.load_script("vlm_pruning")
    lm = ms.save_checkpoint(tmp_path / "lm", num_layers=1)  # a text-only Llama
    with pytest.raises(UsageError, match="a 'llama' model; visual-token pruning supports"):
        script.run_accuracy(script.build_parser().parse_args(
            ["accuracy", "--model", str(lm), "--data", str(user_data), "--out", str(tmp_path / "o")]))


def test_a_llava_saved_before_processors_were_saved_gets_its_training_processor(tmp_path):
    """train.py's final/ from before this change has a tokenizer and no processor: the LLaVA processor is rebuilt
    from its config, and it prepares pixels and prompts exactly as training did."""
    from transformers import LlavaForConditionalGeneration

    from owlore.pruning.vlm_inputs import Prompter, load_processor
    from owlore.vision.llava import pixel_values, prompt_ids

    model, tok = build_llava(ms.tiny_model(2), eval_support.tokenizer(), TOWER)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    processor = load_processor(tmp_path, LlavaForConditionalGeneration.from_pretrained(tmp_path))
    image = np.random.default_rng(2).integers(0, 256, (28, 28), dtype=np.uint8)
    prompter = Prompter(processor)
    enc = prompter.batch([prompter.prompt("Is there a bag?")], [load_image(image)])
    assert enc["input_ids"][0].tolist() == prompt_ids(tok, "Is there a bag?", TOWER.num_tokens)
    torch.testing.assert_close(enc["pixel_values"], pixel_values([image]))
    ms.save_checkpoint(tmp_path / "lm", num_layers=1)
    with pytest.raises(UsageError, match="no processor"):
        load_processor(tmp_path / "lm")
