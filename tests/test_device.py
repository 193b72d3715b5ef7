"""Jobs on any device: device settings, batch moves, bf16 autocast, activation checkpointing and memory, jagged ops per device.

CPU runs everything here but the `gpu`-marked tests, which run the same checks on CUDA (they
skip without it; the GPU commands are in docs/gpu.md).
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedTensor

from lumrec.config import ConfigError, ConfigValueError
from lumrec.data.batches import iter_packed_batches
from lumrec.data.synthetic import SynthConfig, generate
from lumrec.data.tokens import TokenConfig
from lumrec.device import (activation_meter, autocast, module_device, move_to_device, resolve_device,
                           set_activation_checkpointing)
from lumrec.modules.layers.hstu import HSTUConfig, HSTUStack
from lumrec.modules.layers.transformer import TransformerConfig, TransformerStack
from lumrec.modules.ops import (
    Kernel,
    jagged_positions,
    jagged_to_padded_dense,
    jagged_to_padded_dense_reference,
    lengths_to_offsets,
    lengths_to_offsets_reference,
    offsets_to_ids,
    padded_dense_to_jagged,
    padded_dense_to_jagged_reference,
    ranges_to_indices,
    segment_positions,
    use_kernel,
)
from lumrec.pipelines.pretrain import DataConfig, PretrainConfig, Pretrainer, TrainConfig

gpu = pytest.mark.gpu
DEVICES = ["cpu", pytest.param("cuda", marks=gpu)]
_HSTU = {"num_layers": 2, "input_dropout": 0.1, "hstu": {"d_model": 8, "num_heads": 2, "dqk": 4, "dv": 4, "dropout": 0.1}}
_LUM = {"d_model": 8, "num_layers": 2, "num_heads": 2, "ffn_dim": 16, "dropout": 0.1}


@pytest.fixture
def no_cuda(monkeypatch):
    """This process as on a machine without a GPU, whatever the machine."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


# -- settings ---------------------------------------------------------------------------------


def test_device_settings_resolve(no_cuda, monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto", "train.device") == torch.device("cpu")  # no GPU: auto is the CPU
    with pytest.raises(ConfigValueError, match=r"train\.device is 'cuda' but this torch .* sees no CUDA GPU"):
        resolve_device("cuda", "train.device")
    with pytest.raises(ConfigValueError, match=r"^device must be one of \('auto', 'cpu', 'cuda'\), got 'gpu'"):
        resolve_device("gpu")
    # A rank's GPU is its LOCAL_RANK: one more rank than GPUs is refused, naming the key.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device("auto") == torch.device("cuda", 1)
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(ConfigValueError, match=r"query\.device asks for this rank's GPU, cuda:2 \(LOCAL_RANK\), but 2 GPU"):
        resolve_device("cuda", "query.device")


def test_config_keys_are_checked_and_named():
    with pytest.raises(ConfigValueError, match=r"train\.device must be one of"):
        TrainConfig(device="gpu")
    with pytest.raises(ConfigValueError, match=r"train\.precision must be one of \('fp32', 'bf16'\), got 'fp16'"):
        TrainConfig(precision="fp16")
    assert (TrainConfig().device, TrainConfig().precision, TrainConfig().activation_checkpointing) == ("cpu", "fp32", False)


# -- moves, autocast, meters ------------------------------------------------------------------


@pytest.fixture(scope="module")
def synth_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("synth") / "data"
    generate(path, SynthConfig(num_users=60, num_items=40, num_categories=4, num_queries=5, num_days=2))
    return str(path)


def _batch(synth_path):
    from lumrec.data.dataset import Dataset
    from lumrec.data.sequences import sequences_from_dataset
    from lumrec.pipelines.retrieval_eval import build_tokens

    tokens = build_tokens(sequences_from_dataset(Dataset(synth_path)), TokenConfig(), lum=False)
    return next(iter_packed_batches(tokens, 16, 4))


def test_a_batch_moved_to_the_cpu_keeps_its_tensors(synth_path):
    batch = _batch(synth_path)
    moved = move_to_device(batch, "cpu")
    assert moved.offsets is batch.offsets and moved.kjt is batch.kjt and moved.max_len == batch.max_len
    nested = move_to_device({"a": [batch.item_id, (batch.ts, 3)], "b": None}, torch.device("cpu"))
    assert nested["a"][0] is batch.item_id and nested["a"][1][1] == 3 and nested["b"] is None
    keyed = KeyedTensor(keys=["a"], length_per_key=[2], values=torch.ones(3, 2))
    assert move_to_device([keyed], "cpu")[0] is keyed


@gpu
def test_a_batch_moves_to_cuda_whole_and_back(synth_path):
    batch = _batch(synth_path)
    moved = move_to_device(batch, torch.device("cuda", 0))
    assert moved.offsets.device.type == "cuda" and moved.kjt.device().type == "cuda"
    assert torch.equal(moved.item_id.cpu(), batch.item_id) and torch.equal(moved.kjt.values().cpu(), batch.kjt.values())
    back = move_to_device(moved, "cpu")
    assert back.token_type.device.type == "cpu" and torch.equal(back.position, batch.position)


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_autocast_and_fp32(device):
    a = torch.ones(2, 2, device=device)
    with autocast(torch.device(device), "bf16"):
        assert (a @ a).dtype == torch.bfloat16
    with autocast(torch.device(device), "fp32"):
        assert (a @ a).dtype == torch.float32


def test_saved_tensor_meter_counts_activations_not_parameters():
    layer = torch.nn.Linear(16, 16)
    x = torch.randn(32, 16)
    meter = activation_meter(torch.device("cpu"), layer.parameters())
    with meter:
        y = torch.relu(layer(x)).sum()
    # linear saves its input (32 x 16 floats; weight excluded), relu its output (32 x 16 floats)
    assert meter.bytes == 2 * 32 * 16 * 4 and "CPU estimate" in meter.method
    y.backward()  # the measured graph still runs backward
    assert layer.weight.grad is not None


# -- activation checkpointing -----------------------------------------------------------------


def _stack_case(kind: str, seed: int):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 9, (4,), generator=g)
    offsets = lengths_to_offsets(lengths)
    total = int(offsets[-1])
    x = torch.randn(total, 8, generator=g)
    torch.manual_seed(seed)
    if kind == "hstu":
        stack = HSTUStack(HSTUConfig(d_model=8, num_heads=2, dqk=4, dv=4, max_len=16, dropout=0.2), num_layers=3)
        extra = {"timestamps": torch.cumsum(torch.randint(1, 100, (total,), generator=g), 0)}
    else:
        stack = TransformerStack(TransformerConfig(d_model=8, num_heads=2, ffn_dim=16, max_len=16, dropout=0.2), num_layers=3)
        extra = {}
    return stack, x, offsets, extra


@pytest.mark.parametrize("kind", ["hstu", "transformer"])
@pytest.mark.parametrize("seed", range(3))
def test_activation_checkpointing_gives_the_same_gradients(kind, seed):
    """Recomputed activations (dropout on: the RNG state is restored) give bit-identical outputs and gradients on CPU fp32."""
    stack, x, offsets, extra = _stack_case(kind, seed)
    grads = []
    for enabled in (False, True):
        assert set_activation_checkpointing(stack, enabled) == 1
        stack.zero_grad(set_to_none=True)
        inp = x.clone().requires_grad_(True)
        torch.manual_seed(100 + seed)
        out = stack(inp, offsets, **extra)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads.append((out.detach(), inp.grad, {n: p.grad.clone() for n, p in stack.named_parameters()}))
    (out0, gx0, gp0), (out1, gx1, gp1) = grads
    assert torch.equal(out0, out1) and torch.equal(gx0, gx1)
    for name in gp0:
        assert torch.equal(gp0[name], gp1[name]), name


def test_activation_checkpointing_keeps_less_for_the_backward():
    stack, x, offsets, extra = _stack_case("hstu", 0)
    kept = []
    for enabled in (False, True):
        set_activation_checkpointing(stack, enabled)
        meter = activation_meter(torch.device("cpu"), stack.parameters())
        with meter:
            stack(x.clone().requires_grad_(True), offsets, **extra)
        kept.append(meter.bytes)
    assert kept[1] < kept[0] / 2, kept


# -- jagged ops on every path and device ------------------------------------------------------


def _jagged_case(seed: int, device: str):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 7, (int(torch.randint(1, 6, (1,), generator=g)),), generator=g)
    values = torch.randn(int(lengths.sum()), 3, generator=g)
    return lengths.to(device), values.to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kernel", list(Kernel))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("seed", range(4))
def test_jagged_ops_match_the_references_on_each_device(device, kernel, dtype, seed):
    """Every path (fbgemm where the device has a kernel, PyTorch elsewhere, the references) on random shapes."""
    lengths, values = _jagged_case(seed, device)
    values = values.to(dtype).requires_grad_(True)
    max_len = int(lengths.max()) if lengths.numel() else 0
    with use_kernel(kernel):
        offsets = lengths_to_offsets(lengths)
        assert offsets.device == lengths.device and torch.equal(offsets, lengths_to_offsets_reference(lengths))
        cut = max(max_len - 1, 1)  # longer rows truncated
        dense = jagged_to_padded_dense(values, offsets, cut, padding_value=-1.0)
        back = padded_dense_to_jagged(jagged_to_padded_dense(values, offsets, max_len), offsets)
        ids, positions = offsets_to_ids(offsets), jagged_positions(offsets)
        segs = segment_positions(offsets, (torch.arange(int(offsets[-1]), device=device) // 3))
    ref_values = values.detach().clone().requires_grad_(True)
    ref_dense = jagged_to_padded_dense_reference(ref_values, offsets, cut, -1.0)
    assert dense.device == values.device and torch.equal(dense.detach(), ref_dense.detach())
    assert torch.equal(back.detach(), values.detach())
    assert torch.equal(back.detach(), padded_dense_to_jagged_reference(
        jagged_to_padded_dense_reference(values.detach(), offsets, max_len), offsets, int(offsets[-1])))
    weights = torch.randn(dense.shape, generator=torch.Generator().manual_seed(seed)).to(device=device, dtype=dtype)
    (dense * weights).sum().backward()
    (ref_dense * weights).sum().backward()
    assert torch.equal(values.grad, ref_values.grad)
    # ids / positions against a plain loop
    want_ids, want_pos, want_seg = [], [], []
    for row, n in enumerate(lengths.tolist()):
        want_ids += [row] * n
        want_pos += list(range(n))
    flat = 0
    for row, n in enumerate(lengths.tolist()):
        for i in range(n):  # a new segment at a row start and wherever token index // 3 changes
            start = max(flat + i - (flat + i) % 3, flat)
            want_seg.append(flat + i - start)
        flat += n
    assert ids.tolist() == want_ids and positions.tolist() == want_pos and segs.tolist() == want_seg


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", range(3))
def test_ranges_to_indices_on_each_device(device, seed):
    g = np.random.default_rng(seed)
    starts = torch.tensor(g.integers(0, 50, 5), device=device)
    lengths = torch.tensor(g.integers(0, 4, 5), device=device)
    want = [s + i for s, n in zip(starts.tolist(), lengths.tolist()) for i in range(n)]
    for kernel in Kernel:
        with use_kernel(kernel):
            got = ranges_to_indices(starts, lengths)
        assert got.device == starts.device and got.tolist() == want


# -- the pre-training job ---------------------------------------------------------------------


def _pretrain(synth_path, out, model="hstu", **train) -> Pretrainer:
    options = dict(epochs=1, rows_per_batch=4, num_negatives=8, checkpoint_every_steps=100, log_every_steps=2,
                   eval_rows_per_batch=16)
    options.update(train)
    model_config = _HSTU if model == "hstu" else _LUM
    data = DataConfig(path=synth_path, max_len=16,
                      **({"condition_features": ["scenario"], "item_features": ["item_id", "category_id"]} if model == "lum" else {}))
    return Pretrainer(PretrainConfig(model=model, out=str(out), data=data, train=TrainConfig(**options),
                                     model_config=dict(model_config)))


def test_pretrain_on_cpu_and_auto_without_a_gpu_is_the_same_run(synth_path, tmp_path, no_cuda, caplog):
    with caplog.at_level(logging.INFO, logger="lumrec"):
        cpu = _pretrain(synth_path, tmp_path / "cpu")
        result_cpu = cpu.run(max_steps=3)
    auto = _pretrain(synth_path, tmp_path / "auto", device="auto")
    assert auto.device == torch.device("cpu") and auto.run(max_steps=3) == result_cpu
    for name, tensor in cpu.model.state_dict().items():
        assert torch.equal(tensor, auto.model.state_dict()[name]), name
    lines = [r.getMessage() for r in caplog.records]
    end = next(line for line in lines if line.startswith("pretrain done: "))
    assert "steps 3, " in end and "parameters, " not in end and f"parameters {cpu.num_parameters:,}, device cpu" in end
    assert "tokens per s " in end and "activation memory " in end and "per token (saved tensors (CPU estimate)" in end
    assert cpu.activation_bytes > 0 and cpu.activation_tokens > 0


def test_pretrain_on_cuda_without_a_gpu_is_a_config_error(synth_path, tmp_path, no_cuda):
    with pytest.raises(ConfigError, match=r"train\.device is 'cuda' but this torch"):
        _pretrain(synth_path, tmp_path / "x", device="cuda")
    assert not (tmp_path / "x").exists()  # refused before anything was written


@pytest.mark.parametrize("model", ["hstu", "lum"])
def test_pretrain_with_activation_checkpointing_trains_the_same_weights(synth_path, tmp_path, model):
    plain = _pretrain(synth_path, tmp_path / "plain", model)
    plain.run(max_steps=3)
    ckpt = _pretrain(synth_path, tmp_path / "ckpt", model, activation_checkpointing=True)
    ckpt.run(max_steps=3)
    for name, tensor in plain.model.state_dict().items():
        assert torch.equal(tensor, ckpt.model.state_dict()[name]), name
    assert ckpt.activation_bytes < plain.activation_bytes


def test_activation_checkpointing_needs_a_stack(synth_path, tmp_path):
    from tests.test_pretrain import TinyCausalModel  # noqa: F401  (registers the stack-less "tiny-test" model)

    cfg = PretrainConfig(model="tiny-test", out=str(tmp_path / "t"), data=DataConfig(path=synth_path, max_len=16),
                         train=TrainConfig(activation_checkpointing=True))
    with pytest.raises(ValueError, match=r"train\.activation_checkpointing: model 'tiny-test' has no HSTU or transformer"):
        Pretrainer(cfg)


@pytest.mark.parametrize("model", ["hstu", "lum"])
def test_a_bf16_step_runs_and_its_loss_is_close_to_fp32(synth_path, tmp_path, model):
    losses = {}
    for precision in ("fp32", "bf16"):
        trainer = _pretrain(synth_path, tmp_path / precision, model, precision=precision)
        batch = next(iter(trainer.loader))
        losses[precision] = trainer.train_step(batch)[0]
    assert np.isfinite(losses["bf16"]) and losses["bf16"] == pytest.approx(losses["fp32"], rel=2e-2), losses


@gpu
@pytest.mark.parametrize("precision,checkpointing", [("fp32", False), ("bf16", True)])
def test_a_tiny_pretrain_runs_on_cuda(synth_path, tmp_path, precision, checkpointing):
    trainer = _pretrain(synth_path, tmp_path / precision, "hstu", device="cuda", precision=precision,
                        activation_checkpointing=checkpointing, epochs=2)
    result = trainer.run()
    assert module_device(trainer.model).type == "cuda"
    assert 0.0 <= result["test"]["hr@10"] <= 1.0 and np.isfinite(result["history"][-1]["hr@10"])
    assert trainer.activation_bytes > 0
    # The CUDA run's checkpoint is read on the CPU.
    cpu = _pretrain(synth_path, tmp_path / "cpu", "hstu", init_from=str(tmp_path / precision / "checkpoints"), epochs=1)
    assert cpu.run(max_steps=1)["step"] == 1


# -- ranking, retrieval, query and daily jobs -------------------------------------------------


@pytest.fixture(scope="module")
def rank_world(tmp_path_factory):
    from tests.test_rank_pipeline import DAYS, make_data, write_store

    root = tmp_path_factory.mktemp("rank")
    data = make_data(root)
    for i, day in enumerate(DAYS[:-1]):
        write_store(root / "store", day, seed=i)
    return data, str(root / "store")


def _rank_config(data, store, out, model="sim", **train):
    from tests.test_rank_pipeline import lum_config, rank_config

    return rank_config(data, out, model, lum=lum_config(store), **{"epochs": 1, **train})


def _no_minutes(result: dict) -> dict:
    return {k: v for k, v in result.items() if k != "train_minutes"}


def test_jobs_on_cuda_without_a_gpu_are_config_errors_before_any_work(tmp_path, no_cuda):
    from lumrec.pipelines.daily import DailyConfig, DailyJob
    from lumrec.pipelines.query import QueryConfig, run_query
    from lumrec.pipelines.rank import Ranker
    from lumrec.pipelines.rank_config import RankConfig, RankTrainConfig
    from lumrec.pipelines.retrieve import RetrieveConfig, Retriever

    missing = str(tmp_path / "no-data")  # nothing is read before the device is checked
    train = RankTrainConfig(device="cuda")
    with pytest.raises(ConfigError, match=r"train\.device is 'cuda' but"):
        Ranker(RankConfig(data=missing, out=str(tmp_path / "r"), model="mlp", train=train))
    with pytest.raises(ConfigError, match=r"train\.device is 'cuda' but"):
        Retriever(RetrieveConfig(data=missing, out=str(tmp_path / "t"), train=train))
    with pytest.raises(ConfigError, match=r"query\.device is 'cuda' but"):
        run_query(QueryConfig(checkpoint=missing, as_of_ds="2026-01-02", store=str(tmp_path / "s"), device="cuda"))
    with pytest.raises(ConfigError, match=r"^device is 'cuda' but"):
        DailyJob(DailyConfig(data=missing, out=str(tmp_path / "d"), device="cuda"))
    for make, key in ((lambda: RankTrainConfig(device="gpu"), r"train\.device"),
                      (lambda: QueryConfig(device="gpu"), r"query\.device"),
                      (lambda: DailyConfig(device="gpu"), r"^device")):
        with pytest.raises(ConfigValueError, match=key + r" must be one of \('auto', 'cpu', 'cuda'\), got 'gpu'"):
            make()


def test_daily_gives_its_device_to_every_stage(tmp_path, rank_world):
    from lumrec.pipelines.daily import DailyConfig, DailyJob

    data, store = rank_world
    job = DailyJob(DailyConfig(data=data, out=str(tmp_path / "d"), device="auto", with_lum=False))
    day = job.impression_days[1]
    assert job.pretrain_config(day).train.device == job.query_config(day).device == job.rank_config(day).train.device == "auto"
    default = DailyJob(DailyConfig(data=data, out=str(tmp_path / "e"), with_lum=False))
    assert default.rank_config(day).train.device == "cpu" and default.device == torch.device("cpu")


def test_rank_and_retrieve_with_auto_without_a_gpu_equal_cpu(rank_world, tmp_path, no_cuda):
    from lumrec.pipelines.rank import run_rank
    from lumrec.pipelines.retrieve import run_retrieve
    from tests.test_retrieve_pipeline import config as retrieve_config

    data, store = rank_world
    cpu = run_rank(_rank_config(data, store, tmp_path / "cpu"))
    auto = run_rank(_rank_config(data, store, tmp_path / "auto", device="auto"))
    assert _no_minutes(cpu) == _no_minutes(auto)
    cpu = run_retrieve(retrieve_config(data, tmp_path / "rcpu", lum=True, store=store, epochs=1))
    auto = run_retrieve(retrieve_config(data, tmp_path / "rauto", lum=True, store=store, epochs=1, device="auto"))
    assert _no_minutes(cpu) == _no_minutes(auto)


@gpu
@pytest.mark.parametrize("model", ["mlp", "din", "sim", "hstu"])
def test_a_tiny_rank_runs_on_cuda_like_on_cpu(rank_world, tmp_path, model):
    from lumrec.pipelines.rank import Ranker, run_rank

    data, store = rank_world
    cpu = run_rank(_rank_config(data, store, tmp_path / "cpu", model))
    job = Ranker(_rank_config(data, store, tmp_path / "cuda", model, device="cuda"))
    cuda = job.run()
    assert module_device(job.model).type == "cuda"
    # One epoch from the same initial weights: float rounding apart, the same model.
    assert cuda["test"]["auc"] == pytest.approx(cpu["test"]["auc"], abs=0.02)


@gpu
def test_a_tiny_retrieve_runs_on_cuda_like_on_cpu(rank_world, tmp_path):
    from lumrec.pipelines.retrieve import run_retrieve
    from tests.test_retrieve_pipeline import config as retrieve_config

    data, store = rank_world
    cpu = run_retrieve(retrieve_config(data, tmp_path / "cpu", lum=True, store=store, epochs=1))
    cuda = run_retrieve(retrieve_config(data, tmp_path / "cuda", lum=True, store=store, epochs=1, device="cuda"))
    assert cuda["test"]["recall@10"] == pytest.approx(cpu["test"]["recall@10"], abs=0.05)


@gpu
def test_query_on_cuda_writes_the_cpu_knowledge(synth_path, tmp_path):
    from lumrec.knowledge import load_knowledge
    from lumrec.pipelines.query import QueryConfig, run_query

    _pretrain(synth_path, tmp_path / "lum", "lum").run(max_steps=2)
    day = max(_behaviour_days(synth_path))
    stores = {}
    for device in ("cpu", "cuda"):
        cfg = QueryConfig(checkpoint=str(tmp_path / "lum"), as_of_ds=day, store=str(tmp_path / device), rows_per_batch=3,
                          progress=False, device=device, users="all")
        run_query(cfg)
        stores[device] = load_knowledge(str(tmp_path / device), day)
    conditions = stores["cpu"].conditions
    ids_cpu, vec_cpu = stores["cpu"].user_table(conditions)
    ids_cuda, vec_cuda = stores["cuda"].user_table(conditions)
    assert torch.equal(ids_cpu, ids_cuda) and torch.allclose(vec_cpu, vec_cuda, atol=1e-4)


def _behaviour_days(path: str) -> list[str]:
    from lumrec.data.dataset import Dataset

    return Dataset(path).days("behaviours")
