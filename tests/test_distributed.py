"""Scale-out through the real engines on CPU (gloo, 2 processes, ``torchrun``): each 2-process run equals a
1-process run with the same global batch (losses and final weights), the active-gradient reducer sends only the
active layers, checkpoints written once resume exactly across a layer switch, and unsupported engine/method pairs
are refused with their reasons.

All 2-process runs of one engine share one ``torchrun`` launch (``fixtures/dist_driver.py``), so transformers is
imported once per engine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "fixtures"))
import method_support as ms  # noqa: E402

import train  # noqa: E402
from owlore.run.config import ConfigError  # noqa: E402

ROOT = ms.ROOT
DRIVER = ROOT / "tests" / "fixtures" / "dist_driver.py"
STEPS = 4
# γ=2 of 4 layers re-drawn every 2 steps, so runs switch at steps 0 and 2 (a resume at 2 crosses a switch).
SWITCHING = {"owlore": ["owlore.gamma=2"], "lisa": ["lisa.gamma=2"]}
DDP_METHODS = ["owlore", "lisa", "full", "lora", "galore", "badam"]
LOSS_ATOL = 1e-5
WEIGHT_ATOL = 2e-5
WEIGHT_ATOL_LORA = 1e-4  # LoRA trains at lr 1e-2 here (30x the others), so its rounding differences are larger
FSDP2 = ["full", "lisa", "owlore", "galore"]
DEEPSPEED = [("full", 2), ("full", 3), ("lora", 2), ("lora", 3), ("owlore", 0), ("lisa", 0), ("galore", 0), ("badam", 0)]


def _argv(method: str, model: Path, rows: Path, out: Path, *extra: str, per_device: int, steps: int = STEPS):
    return ms.train_argv(method, model, rows, out, f"training.per_device_train_batch_size={per_device}",
                         "training.save_total_limit=null", "data.limit=null", *SWITCHING.get(method, []), *extra,
                         steps=steps)


def _free_port() -> int:
    import socket

    with socket.socket() as s:  # torchrun's --master_port 0 hangs in the static rendezvous
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(plan: list[dict], tmp: Path, timeout: int = 600) -> str:
    plan_file = tmp / f"plan_{len(list(tmp.glob('plan_*')))}.json"
    plan_file.write_text(json.dumps(plan))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(_free_port()), str(DRIVER), str(plan_file)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    return proc.stdout + proc.stderr


def _weights(out: Path) -> dict[str, torch.Tensor]:
    final = out / "final"
    name = "adapter_model.safetensors" if (final / "adapter_model.safetensors").is_file() else "model.safetensors"
    return ms.load_safetensors(final / name)


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    return ms.save_checkpoint(root / "model"), ms.write_rows(root / "rows.jsonl", 32), root


@pytest.fixture(scope="module")
def single(data):
    """1-process references: global batch 4 = per-device 4."""
    model, rows, root = data
    torch.set_num_threads(1)
    out = {}
    for m in DDP_METHODS:
        summary = train.main(_argv(m, model, rows, root / f"one_{m}", per_device=4))
        out[m] = {"summary": summary, "dir": root / f"one_{m}"}
    return out


@pytest.fixture(scope="module")
def ddp(data, tmp_path_factory):
    """2-process runs (per-device 2, so global batch 4), plus a run resumed from its step-2 checkpoint."""
    model, rows, root = data
    plan = [{"train": _argv(m, model, rows, root / f"ddp_{m}", per_device=2), "result": str(root / f"ddp_{m}.json")}
            for m in DDP_METHODS]
    plan.append({"train": _argv("owlore", model, rows, root / "ddp_accum", "training.gradient_accumulation_steps=2",
                                per_device=1), "result": str(root / "ddp_accum.json")})
    plan += [{"copy": [str(root / "ddp_owlore" / "checkpoint-2"), str(root / "resumed" / "checkpoint-2")]},
             {"train": _argv("owlore", model, rows, root / "resumed",
                             f"training.resume_from_checkpoint={root / 'resumed' / 'checkpoint-2'}", per_device=2),
              "result": str(root / "resumed.json")}]
    log = _torchrun(plan, root)
    runs = {m: {"summary": json.loads((root / f"ddp_{m}.json").read_text()), "dir": root / f"ddp_{m}"}
            for m in DDP_METHODS}
    runs["resumed"] = {"summary": json.loads((root / "resumed.json").read_text()), "dir": root / "resumed"}
    runs["accum"] = {"summary": json.loads((root / "ddp_accum.json").read_text()), "dir": root / "ddp_accum"}
    return runs, log


@pytest.mark.parametrize("method", DDP_METHODS)
def test_two_processes_equal_one_under_ddp(method, single, ddp):
    one, two = single[method], ddp[0][method]
    _assert_same_run(method, one, two)
    assert two["summary"]["replica_checks"] >= 1  # weights (and GaLore bases) compared across ranks at each save


def _assert_same_run(method: str, one: dict, two: dict) -> None:
    """Same per-step losses and final weights (within float tolerance), and the run did move the weights."""
    assert two["summary"]["world_size"] == 2 and one["summary"]["world_size"] == 1
    l1, l2 = one["summary"]["log_losses"], two["summary"]["log_losses"]
    assert len(l1) == len(l2) == STEPS
    assert max(abs(a - b) for a, b in zip(l1, l2)) <= LOSS_ATOL
    before = ms.load_safetensors(Path(one["dir"]).parent / "model" / "model.safetensors")
    w1, w2 = _weights(Path(one["dir"])), _weights(Path(two["dir"]))
    diff = _max_diff(w1, w2)
    assert diff <= (WEIGHT_ATOL_LORA if method == "lora" else WEIGHT_ATOL)
    if method != "lora":  # training moved the weights by far more than the runs differ
        assert _max_diff(w1, {k: before[k] for k in w1}) > max(20 * diff, 1e-4)


@pytest.fixture(scope="module")
def deepspeed_runs(data):
    """2-process DeepSpeed runs: ZeRO-2/3 for the Trainer-optimizer methods, ZeRO-0 for the per-layer ones."""
    model, rows, root = data
    plan = [{"train": _argv(m, model, rows, root / f"ds_{m}{z}",
                            f"training.deepspeed={ROOT / 'configs' / 'deepspeed' / f'zero{z}.json'}", per_device=2),
             "result": str(root / f"ds_{m}{z}.json")} for m, z in DEEPSPEED]
    _torchrun(plan, root)
    return {(m, z): {"summary": json.loads((root / f"ds_{m}{z}.json").read_text()), "dir": root / f"ds_{m}{z}"}
            for m, z in DEEPSPEED}


@pytest.mark.parametrize(("method", "stage"), DEEPSPEED)
def test_two_processes_equal_one_under_deepspeed(method, stage, single, deepspeed_runs):
    one, two = single[method], deepspeed_runs[(method, stage)]
    _assert_same_run(method, one, two)
    if stage < 3:
        assert two["summary"]["replica_checks"] >= 1  # ZeRO 0-2 keep full weights on every rank: compared


@pytest.fixture(scope="module")
def fsdp2_runs(data):
    """2-process FSDP2 runs (``parallel.fsdp2``, one shard unit per layer) and an owlore run resumed at step 2."""
    model, rows, root = data
    scale = ["--config", str(ROOT / "configs" / "scale" / "fsdp2.yaml")]

    def argv(m, out, *extra):
        a = _argv(m, model, rows, out, *extra, per_device=2)
        return a[:2] + scale + a[2:]

    # owlore with the outlier-ratio cache on: its model fingerprint reads every (sharded) weight
    cache = {"owlore": [f"owlore.cache_dir={root / 'lod_cache'}"]}
    plan = [{"train": argv(m, root / f"fsdp_{m}", *cache.get(m, [])), "result": str(root / f"fsdp_{m}.json")}
            for m in FSDP2]
    plan += [{"copy": [str(root / "fsdp_owlore" / "checkpoint-2"), str(root / "fsdp_resumed" / "checkpoint-2")]},
             {"train": argv("owlore", root / "fsdp_resumed",
                            f"training.resume_from_checkpoint={root / 'fsdp_resumed' / 'checkpoint-2'}"),
              "result": str(root / "fsdp_resumed.json")}]
    _torchrun(plan, root)
    runs = {m: {"summary": json.loads((root / f"fsdp_{m}.json").read_text()), "dir": root / f"fsdp_{m}"}
            for m in FSDP2}
    runs["resumed"] = {"summary": json.loads((root / "fsdp_resumed.json").read_text()), "dir": root / "fsdp_resumed"}
    return runs


@pytest.mark.parametrize("method", FSDP2)
def test_two_processes_equal_one_under_fsdp2(method, single, fsdp2_runs):
    """Sharded for real (every parameter a DTensor), and the same losses and weights as one process."""
    one, two = single[method], fsdp2_runs[method]
    _assert_same_run(method, one, two)
    assert two["summary"]["sharded_parameters"] == len(_weights(Path(one["dir"])))
    # each rank holds its shards' state: about half of one process's (GaLore's LEFT-side moments and the bases
    # are replicated, so owlore/galore keep a little more than half)
    ratio = two["summary"]["optimizer_state_bytes"] / one["summary"]["optimizer_state_bytes"]
    assert 0.45 < ratio < (0.8 if method in ("owlore", "galore") else 0.55)


def test_resume_across_a_switch_under_fsdp2(fsdp2_runs):
    straight, resumed = fsdp2_runs["owlore"], fsdp2_runs["resumed"]
    ckpt = Path(straight["dir"]) / "checkpoint-2"
    assert sorted(p.name for p in ckpt.glob("optimizer.rank*")) == ["optimizer.rank0-of-2.pt",
                                                                    "optimizer.rank1-of-2.pt"]
    assert resumed["summary"]["log_losses"] == pytest.approx(straight["summary"]["log_losses"], abs=1e-6)
    assert _max_diff(_weights(Path(straight["dir"])), _weights(Path(resumed["dir"]))) <= 1e-6


def test_gradient_accumulation_under_ddp(single, ddp):
    """2 processes × 2 micro-batches of 1 = one process with batch 4: the reducer all-reduces once per step, after
    the last micro-batch."""
    runs, _ = ddp
    _assert_same_run("owlore", single["owlore"], runs["accum"])
    assert runs["accum"]["summary"]["comm_syncs"] == STEPS


def _disagree(rank: int, world: int, init: str, out: str) -> None:
    import torch.distributed as dist

    from owlore.parallel.distributed import SwitchingDataParallel

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        SwitchingDataParallel().check_switch(4, [0, 2] if rank == 0 else [1, 2])
    except RuntimeError as e:
        Path(out, f"rank{rank}.txt").write_text(str(e))
    finally:
        dist.destroy_process_group()


def test_ranks_that_draw_different_layers_fail_loudly(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_disagree, args=(2, f"file://{tmp_path / 'store'}", str(tmp_path)), nprocs=2)
    for r in (0, 1):
        msg = (tmp_path / f"rank{r}.txt").read_text()
        assert "decoder layers drawn at step 4 differ across ranks (rank 0: [0, 2], rank 1: [1, 2])" in msg
        assert "owlore.seed" in msg


def test_layer_switching_sends_only_the_active_layers(ddp, data):
    """The reducer's bytes per step are exactly the tensors that train now (γ active layers + what trains outside
    the layers); DDP (full) sends every parameter at every step."""
    from safetensors import safe_open

    runs, _ = ddp
    with safe_open(str(data[2] / "model" / "model.safetensors"), "pt") as f:
        names = f.keys()
        nbytes = {k: int(torch.tensor(f.get_slice(k).get_shape()).prod()) * 4 for k in names}
    assert runs["full"]["summary"]["comm_bytes_per_sync"] == sum(nbytes.values())  # DDP's buckets: everything
    for m in ("owlore", "lisa", "badam"):
        s = runs[m]["summary"]
        record = json.loads((Path(runs[m]["dir"]) / "owlore_record.json").read_text())
        c = record["config"]
        active = record["history"][-1]["layers"]
        outside = {"model.embed_tokens.weight": c["train_embeddings"], "lm_head.weight": c["train_lm_head"],
                   "model.norm.weight": c["train_norms"]}
        expected = sum(n for k, n in nbytes.items() if any(f"layers.{i}." in k for i in active) or outside.get(k))
        assert s["comm_syncs"] == STEPS
        assert s["comm_bytes_last_sync"] == expected
        assert s["comm_bytes_last_sync"] < 0.75 * runs["full"]["summary"]["comm_bytes_per_sync"]


def test_resume_across_a_switch_under_ddp(ddp):
    runs, log = ddp
    straight, resumed = runs["owlore"], runs["resumed"]
    rec_s = json.loads((Path(straight["dir"]) / "owlore_record.json").read_text())
    rec_r = json.loads((Path(resumed["dir"]) / "owlore_record.json").read_text())
    assert [h["step"] for h in rec_s["history"]] == [0, 2]  # the resumed run crosses the step-2 switch
    assert rec_r["history"] == rec_s["history"]
    # the resumed run's log holds steps 1-2 from the checkpoint and steps 3-4 it computed itself
    assert resumed["summary"]["log_losses"] == pytest.approx(straight["summary"]["log_losses"], abs=1e-6)
    assert _max_diff(_weights(Path(straight["dir"])), _weights(Path(resumed["dir"]))) <= 1e-6


def test_rank_zero_logs_once(ddp):
    """Each switch is logged once (by rank 0), not once per rank; the resumed run re-logs only its step-2 switch."""
    runs, log = ddp

    def switches(name):
        return len(json.loads((Path(runs[name]["dir"]) / "owlore_record.json").read_text())["history"])

    expected = sum(switches(m) for m in ("owlore", "lisa", "badam", "accum")) + switches("resumed") - 1
    assert log.count("training decoder layers [") == expected


def test_zero_stage_above_zero_is_refused_for_per_layer_optimizers(tmp_path):
    model = ms.save_checkpoint(tmp_path / "m")
    rows = ms.write_rows(tmp_path / "r.jsonl")
    for method in ("owlore", "galore", "lisa", "badam"):
        with pytest.raises(SystemExit) as e:
            train.main(_argv(method, model, rows, tmp_path / method,
                             f"training.deepspeed={ROOT / 'configs/deepspeed/zero2.json'}", per_device=2))
        assert e.value.code == 2
    from owlore.run.recipe import load_config

    with pytest.raises(ConfigError, match="ZeRO stage 3.*zero0.json.*plain data parallelism"):
        load_config(ROOT / "configs/smollm2_owlore.yaml", ["training.deepspeed=configs/deepspeed/zero3.json",
                                                            "training.output_dir=x"])
    with pytest.raises(ConfigError, match="parallel.fsdp2=true with method lora: FSDP2 is supported for owlore, full, galore, lisa;"):
        load_config(ROOT / "configs/smollm2_lora.yaml", ["parallel.fsdp2=true", "training.output_dir=x"])
    with pytest.raises(ConfigError, match="parallel.fsdp2=true with memory.frozen_weights"):
        load_config(ROOT / "configs/smollm2_owlore.yaml", ["parallel.fsdp2=true", "memory.frozen_weights=int8",
                                                            "training.output_dir=x"])
    with pytest.raises(ConfigError, match="training.fsdp with method owlore.*parallel.fsdp2=true"):
        load_config(ROOT / "configs/smollm2_owlore.yaml", ["training.fsdp=full_shard", "training.output_dir=x"])
    with pytest.raises(SystemExit):  # one process: FSDP2 needs torchrun
        train.main(_argv("owlore", model, rows, tmp_path / "one", "parallel.fsdp2=true", per_device=2))
    with pytest.raises(ConfigError, match="training.deepspeed='nope.json': no such file"):
        load_config(ROOT / "configs/smollm2_full.yaml", ["training.deepspeed=nope.json", "training.output_dir=x"])


def test_a_stock_trainer_without_the_install_call_is_told_what_to_do():
    """Under torchrun, a layer-switching callback in a Trainer that would build DDP refuses to start."""
    from owlore.parallel.distributed import SwitchingDataParallel

    with pytest.raises(RuntimeError, match=r"install_active_gradient_sync\(trainer\) before trainer.train\(\)"):
        SwitchingDataParallel().attach(torch.nn.Linear(2, 2))


def _scores(rank: int, world: int, init: str, out: str) -> None:
    import torch.distributed as dist

    from owlore.parallel.distributed import SwitchingDataParallel

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    calls = []

    def compute():  # ranks whose kernels round differently: a thresholded count flips on rank 1
        calls.append(rank)
        return torch.tensor([0.01, 0.02 + 0.001 * rank, 0.03], dtype=torch.float64)

    try:
        dp = SwitchingDataParallel()
        replicated = dp.scores_from_rank0(compute, 3, every_rank_computes=False)
        sharded = dp.scores_from_rank0(compute, 3, every_rank_computes=True)
        Path(out, f"scores{rank}.json").write_text(json.dumps(
            {"replicated": replicated.tolist(), "sharded": sharded.tolist(), "calls": calls}))
    finally:
        dist.destroy_process_group()


def test_outlier_ratios_are_computed_on_rank0_and_broadcast(tmp_path):
    """Every rank samples from rank 0's ratios; a replicated model is calibrated on rank 0 alone, a sharded one
    by every rank (its forward needs them all)."""
    import torch.multiprocessing as mp

    mp.spawn(_scores, args=(2, f"file://{tmp_path / 'store'}", str(tmp_path)), nprocs=2)
    got = [json.loads((tmp_path / f"scores{r}.json").read_text()) for r in (0, 1)]
    for g in got:
        assert g["replicated"] == g["sharded"] == [0.01, 0.02, 0.03]
    assert got[0]["calls"] == [0, 0] and got[1]["calls"] == [1]


def _svd_fails_on_rank0(rank: int, world: int, init: str, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import owlore.optim.galore_adamw as optim_module
    from owlore.optim.galore_adamw import GaLoreAdamW

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 6, bias=False))
        fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
        opt = GaLoreAdamW([{"params": list(model.parameters()), "rank": 2, "update_proj_gap": 1}], lr=1e-2)
        x = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
        real, calls = optim_module.compute_basis, []

        def flaky(grad, r, side):
            calls.append(len(calls))
            if len(calls) == 2:  # the second refresh fails on rank 0: every rank must keep its basis
                raise torch.linalg.LinAlgError("injected")
            return real(grad, r, side)

        optim_module.compute_basis = flaky
        for _ in range(3):
            model(x).pow(2).sum().backward()
            opt.step()
            opt.zero_grad()
        w = next(model.parameters()).full_tensor()
        Path(out, f"svd{rank}.json").write_text(json.dumps({"calls": len(calls), "w": w.flatten().tolist()}))
    finally:
        dist.destroy_process_group()


def test_fsdp2_basis_is_computed_on_mesh_rank0_and_its_failure_reaches_every_rank(tmp_path):
    """Only rank 0 runs the SVD (the others used to repeat it and discard theirs); when it fails there, every rank
    keeps its previous basis instead of waiting for a broadcast that never comes."""
    import torch.multiprocessing as mp

    mp.spawn(_svd_fails_on_rank0, args=(2, f"file://{tmp_path / 'store'}", str(tmp_path)), nprocs=2)
    got = [json.loads((tmp_path / f"svd{r}.json").read_text()) for r in (0, 1)]
    assert got[0]["calls"] == 3 and got[1]["calls"] == 0
    assert got[0]["w"] == got[1]["w"]


def test_reentrant_checkpointing_is_refused_by_the_active_gradient_reducer():
    """Its nested backward per checkpointed layer would end the reducer's round early: every layer's gradients
    would be all-reduced again per segment. Refused before any process group is touched."""
    from owlore.layerwise.checkpointing import _maybe_reentrant
    from owlore.parallel.distributed import SwitchingDataParallel

    model = ms.tiny_model(2)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    dp = SwitchingDataParallel()
    dp.installed = True
    with pytest.raises(RuntimeError, match="reentrant gradient checkpointing.*use_reentrant: false"):
        dp.attach(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert not any(getattr(m, "gradient_checkpointing", False) and _maybe_reentrant(m) for m in model.modules())
