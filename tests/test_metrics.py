"""FLOPs accounting, the peak table, MFU, the metrics writer, progress and throughput."""

import io
import json
import math
import struct
import types

import jax
import jax.numpy as jnp
import matplotlib.image
import numpy as np
import pytest
from flax import nnx
from tensorboardX.proto import event_pb2

from llm_jax.models import GPT, T5, ModelConfig
from llm_jax.train import flops
from llm_jax.train.metrics import (
    LOSS_CURVE_FILE,
    METRICS_FILE,
    TENSORBOARD_DIR,
    MetricsWriter,
    Progress,
    Throughput,
    format_postfix,
    read_metrics,
)

# FLOPs: hand counts from the published architectures ---------------------------------------


def test_gpt2_small_flops_hand_count():
    d, layers, f, v, t = 768, 12, 3072, 50257, 1024
    attention = 4 * d * d  # q, k, v, o: [768, 768] each
    mlp = 2 * d * f  # [768, 3072] and [3072, 768]
    non_embedding = layers * (attention + mlp)
    assert non_embedding == 84_934_656  # the "85M non-embedding parameters" of GPT-2 small
    n = non_embedding + d * v  # + the tied output projection, whose matmul still runs
    cfg = ModelConfig.preset("gpt2-small")
    assert flops.matmul_params(cfg) == n
    assert flops.matmul_params(cfg, lm_head=False) == non_embedding
    expected = 6 * n + 12 * layers * t * d  # PaLM appendix B: 6N + 12·L·H·Q·T
    assert flops.model_flops_per_token(cfg, t) == expected == 854_438_400
    assert flops.inference_flops_per_token(cfg, t) == 2 * n + 4 * layers * t * d
    assert flops.model_flops_per_sequence(cfg, t) == expected * t


def test_llama_gqa_flops_hand_count():
    # LLaMA-3.2-1B: D 2048, 16 layers, 32 query heads and 8 KV heads of 64, SwiGLU F 8192.
    d, layers, n_heads, k_heads, h, f, v, t = 2048, 16, 32, 8, 64, 8192, 128256, 2048
    attention = d * n_heads * h + 2 * d * k_heads * h + n_heads * h * d
    mlp = 3 * d * f  # gate, up, down
    n = layers * (attention + mlp) + d * v
    # Plus the norms (2 per layer + final, 2048 each) this is the published parameter count.
    assert n + (2 * layers + 1) * d == 1_235_814_400
    cfg = ModelConfig.preset("llama-1b")
    assert flops.matmul_params(cfg) == n
    assert flops.model_flops_per_token(cfg, t) == 6 * n + 12 * layers * t * n_heads * h


def test_t5_counts_encoder_and_decoder():
    # T5-small: D 512, 6 + 6 layers, 8 heads of 64, ReLU MLP F 2048, tied head V 32128.
    d, layers, f, v, s, t = 512, 6, 2048, 32128, 512, 114
    block = 4 * d * d + 2 * d * f
    encoder = 2 * s * layers * block + layers * 4 * s * s * d
    decoder = (
        2 * t * layers * (block + 2 * d * d)  # self attention + MLP + cross-attention q, o
        + 2 * s * layers * 2 * d * d  # cross-attention k, v over the encoder outputs
        + layers * 4 * (t * t + t * s) * d  # self and cross attention scores and mixing
        + 2 * t * d * v  # output projection
    )
    cfg = ModelConfig.preset("t5-small")
    per_sequence = flops.model_flops_per_sequence(cfg, enc_len=s, dec_len=t)
    assert per_sequence == 3 * (encoder + decoder)
    assert flops.model_flops_per_token(cfg, enc_len=s, dec_len=t) == per_sequence / (s + t)
    assert flops.matmul_params(cfg) == layers * block + layers * (block + 4 * d * d) + d * v
    with pytest.raises(ValueError, match="enc_len"):
        flops.model_flops_per_token(cfg, 512)
    with pytest.raises(ValueError, match="seq_len"):
        flops.model_flops_per_token(ModelConfig.preset("gpt2-small"), enc_len=8, dec_len=8)


def test_bert_mlm_head_and_classification():
    cfg = ModelConfig.preset("bert-base")
    d, layers, f, v, t = 768, 12, 3072, 30522, 512
    body = layers * (4 * d * d + 2 * d * f)
    mlm_head = d * d + d * v  # transform [D, D] + tied decoder [D, V]
    per_sequence_heads = d * d + 2 * d  # pooler + NSP, once per sequence
    expected = 3 * (2 * t * (body + mlm_head) + layers * 4 * t * t * d + 2 * per_sequence_heads)
    assert flops.model_flops_per_sequence(cfg, t) == expected
    no_head = flops.model_flops_per_sequence(cfg, t, lm_head=False)
    assert expected - no_head == 3 * 2 * t * mlm_head


def test_flops_and_tokens_read_the_objective_spec():
    from llm_jax.data.objectives import objective_spec

    b, s, t = 4, 32, 12
    t5 = ModelConfig.preset("t5-small")
    enc_dec = {"encoder_tokens": np.zeros((b, s)), "decoder_tokens": np.zeros((b, t))}
    for name in ("seq2seq", "span_corruption"):  # source plus target tokens
        got = flops.flops_and_tokens(t5, objective_spec(name), enc_dec)
        assert got == (flops.model_flops_per_token(t5, enc_len=s, dec_len=t), b * (s + t))
    bert = ModelConfig.preset("bert-base")
    rows = {"tokens": np.zeros((b, s)), "labels": np.zeros((b,))}
    assert flops.flops_and_tokens(bert, objective_spec("mlm"), rows) == (
        flops.model_flops_per_token(bert, s),
        b * s,
    )
    # Classification runs no vocabulary projection.
    assert flops.flops_and_tokens(bert, objective_spec("classification"), rows) == (
        flops.model_flops_per_token(bert, s, lm_head=False),
        b * s,
    )


def _kernel_sizes(module) -> int:
    """Weights of every dense (Einsum) layer of an abstractly initialised model."""
    state = nnx.state(module, nnx.Param)
    total = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(state):
        if any(getattr(k, "key", None) == "kernel" for k in path):
            total += int(np.prod(leaf.shape))
    return total


@pytest.mark.parametrize("preset", ["gpt2-tiny", "llama-tiny", "t5-tiny"])
def test_matmul_params_match_the_model(preset):
    cfg = ModelConfig.preset(preset)
    cls = T5 if cfg.family == "t5" else GPT
    model = nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0)))
    tied_head = cfg.d_model * cfg.vocab_size if cfg.tie_embeddings else 0
    assert flops.matmul_params(cfg) == _kernel_sizes(model) + tied_head


def _xla_flops(fn, *args) -> float:
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    return (cost[0] if isinstance(cost, list) else cost)["flops"]


@pytest.mark.parametrize("preset", ["gpt2-tiny", "llama-tiny", "t5-tiny"])
def test_forward_flops_against_xla_cost_analysis(preset):
    # XLA counts every matmul (2·M·N·K) plus the element-wise work we leave out, so our
    # count is a lower bound within a few percent when the matmuls are wide enough.
    cfg = ModelConfig.preset(preset, d_model=256, d_ff=1024)
    cls = T5 if cfg.family == "t5" else GPT
    graphdef, state = nnx.split(cls(cfg, rngs=nnx.Rngs(0)))
    if cfg.family == "t5":
        s, t = 96, 32
        measured = _xla_flops(
            lambda st, a, b: nnx.merge(graphdef, st)(a, b),
            state,
            jnp.zeros((1, s), jnp.int32),
            jnp.zeros((1, t), jnp.int32),
        )
        ours = flops.model_flops_per_sequence(cfg, enc_len=s, dec_len=t, training=False)
    else:
        t = 128
        measured = _xla_flops(
            lambda st, x: nnx.merge(graphdef, st)(x), state, jnp.zeros((1, t), jnp.int32)
        )
        ours = flops.model_flops_per_sequence(cfg, t, training=False)
    assert ours <= measured <= 1.03 * ours


# Peak FLOP/s and MFU -----------------------------------------------------------------------


def _device(kind: str):
    return types.SimpleNamespace(device_kind=kind)


def test_peak_table_lookup():
    assert flops.peak_flops_per_device(jax.devices("cpu")[0]) is None
    assert flops.peak_flops_per_device() is None  # the tests run on CPU
    assert flops.peak_flops_per_device(_device("NVIDIA H100 80GB HBM3")) == 989e12
    assert flops.peak_flops_per_device(_device("NVIDIA H100 PCIe")) == 756e12
    assert flops.peak_flops_per_device(_device("NVIDIA H200")) == 989e12
    assert flops.peak_flops_per_device(_device("NVIDIA A100-SXM4-40GB")) == 312e12
    assert flops.peak_flops_per_device(_device("NVIDIA A100-PCIE-40GB"), "float32") == 156e12
    assert flops.peak_flops_per_device(_device("NVIDIA L4")) == 121e12
    assert flops.peak_flops_per_device(_device("NVIDIA L40S")) == 362e12
    assert flops.peak_flops_per_device(_device("NVIDIA A10G")) == 70e12
    assert flops.peak_flops_per_device(_device("NVIDIA A10")) == 125e12
    assert flops.peak_flops_per_device(_device("Tesla T4"), "float16") == 65e12
    assert flops.peak_flops_per_device(_device("Tesla T4"), "float32") == 8.1e12
    assert flops.peak_flops_per_device(_device("Tesla V100-SXM2-32GB")) == 125e12
    assert flops.peak_flops_per_device(_device("TPU v3")) == 123e12 / 2  # 2 devices per chip
    assert flops.peak_flops_per_device(_device("TPU v4")) == 275e12
    assert flops.peak_flops_per_device(_device("TPU v4"), "float32") == 275e12
    assert flops.peak_flops_per_device(_device("TPU v5 lite")) == 197e12
    assert flops.peak_flops_per_device(_device("TPU v5p")) == 459e12
    assert flops.peak_flops_per_device(_device("TPU v6 lite")) == 918e12
    assert flops.peak_flops_per_device(_device("NVIDIA GeForce RTX 4090")) is None
    assert flops.peak_flops_per_device(_device("NVIDIA A10G"), "float32") is None
    with pytest.raises(ValueError, match="bfloat16"):
        flops.peak_flops_per_device(_device("TPU v4"), "bf16")


def test_mfu_and_its_format():
    peak = flops.peak_flops_per_device(jax.devices("cpu")[0])
    assert flops.mfu(1e4, 1e9, 8, peak) is None
    assert flops.format_mfu(flops.mfu(1e4, 1e9, 8, peak)) == "n/a"
    assert flops.mfu(None, 1e9, 1, 1e12) is None
    assert flops.mfu(1000.0, 1e9, 2, 1e12) == 0.5
    assert flops.format_mfu(0.4127) == "41.3%"


# MetricsWriter -----------------------------------------------------------------------------


def _crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
    crc = _crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _read_events(path) -> list[event_pb2.Event]:
    """TFRecord framing: u64 length, masked crc32c(length), data, masked crc32c(data)."""
    raw, events, i = path.read_bytes(), [], 0
    while i < len(raw):
        header = raw[i : i + 8]
        (length,) = struct.unpack("<Q", header)
        assert struct.unpack("<I", raw[i + 8 : i + 12])[0] == _masked_crc(header)
        data = raw[i + 12 : i + 12 + length]
        assert struct.unpack("<I", raw[i + 12 + length : i + 16 + length])[0] == _masked_crc(data)
        events.append(event_pb2.Event.FromString(data))
        i += 16 + length
    return events


def _no_nan(token):
    raise AssertionError(f"non-standard JSON constant {token}")


def test_metrics_writer_jsonl_tensorboard_and_curve(tmp_path):
    losses = {step: 6.0 * math.exp(-step / 40) + 1.5 for step in range(1, 121)}
    with MetricsWriter(tmp_path, enabled=True, run_name="test-run") as writer:
        for step, loss in losses.items():
            writer.write(step, {"loss": np.float32(loss), "learning_rate": 1e-3}, prefix="train")
            if step % 30 == 0:
                writer.write(step, {"eval/loss": jnp.asarray(loss + 0.2)})
        writer.write(121, {"loss": float("nan")}, prefix="train")

    lines = (tmp_path / METRICS_FILE).read_text().splitlines()
    records = [json.loads(line, parse_constant=_no_nan) for line in lines]
    assert records == read_metrics(tmp_path / METRICS_FILE)
    assert len(records) == 120 + 4 + 1
    assert set(records[0]) == {"step", "time", "train/loss", "train/learning_rate"}
    assert records[0]["step"] == 1 and records[0]["train/loss"] == pytest.approx(losses[1])
    assert [r["step"] for r in records if "eval/loss" in r] == [30, 60, 90, 120]
    assert records[-1]["train/loss"] is None  # NaN is written as null

    (event_file,) = (tmp_path / TENSORBOARD_DIR).glob("events.out.tfevents.*")
    scalars = {}
    for event in _read_events(event_file):
        for value in event.summary.value:
            scalars.setdefault(value.tag, {})[event.step] = value.simple_value
    assert set(scalars) == {"train/loss", "train/learning_rate", "eval/loss"}
    assert scalars["train/loss"][40] == pytest.approx(losses[40], rel=1e-6)
    assert sorted(scalars["eval/loss"]) == [30, 60, 90, 120]

    png = tmp_path / LOSS_CURVE_FILE
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 10_000
    rgb = matplotlib.image.imread(png)[..., :3]

    def pixels_near(color):
        return int(np.sum(np.all(np.abs(rgb - np.array(color)) < 0.08, axis=-1)))

    assert pixels_near((0x1F / 255, 0x77 / 255, 0xB4 / 255)) > 200  # the train curve (C0)
    assert pixels_near((0xFF / 255, 0x7F / 255, 0x0E / 255)) > 50  # the eval points (C1)


def test_metrics_writer_rejects_bad_metrics(tmp_path):
    with MetricsWriter(tmp_path, enabled=True, tensorboard=False, loss_curve=False) as writer:
        with pytest.raises(ValueError, match="shape"):
            writer.write(1, {"loss": np.ones(3)})
        with pytest.raises(ValueError, match="reserved"):
            writer.write(1, {"step": 1})


def test_resumed_writer_drops_records_after_the_checkpoint(tmp_path):
    with MetricsWriter(tmp_path, enabled=True, loss_curve=False) as writer:
        for step in range(1, 11):
            writer.write(step, {"loss": 10.0 - step}, prefix="train")
    with open(tmp_path / METRICS_FILE, "a") as f:
        f.write('{"step": 11, "train/lo')  # killed mid-line
    with MetricsWriter(tmp_path, enabled=True, resume_step=5) as writer:
        writer.write(6, {"loss": 0.5}, prefix="train")
        assert writer.jsonl_path == tmp_path / METRICS_FILE
    records = read_metrics(tmp_path / METRICS_FILE)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert records[-1]["train/loss"] == 0.5
    assert writer.loss_curve_path.exists()
    # TensorBoard drops the old run's events from step 6 on when it sees this marker.
    events = [e for f in (tmp_path / TENSORBOARD_DIR).iterdir() for e in _read_events(f)]
    assert [e.step for e in events if e.HasField("session_log")] == [6]


def test_disabled_writer_writes_nothing(tmp_path):
    workdir = tmp_path / "run"
    writer = MetricsWriter(workdir, enabled=False)
    writer.write(1, {"loss": 1.0}, prefix="train")
    writer.close()
    assert not workdir.exists()


# Progress and throughput -------------------------------------------------------------------


def test_progress_logs_lines_when_not_a_tty():
    out, now = io.StringIO(), [0.0]
    progress = Progress(20, 0, log_every=5, file=out, enabled=True, clock=lambda: now[0])
    for step in range(1, 21):
        now[0] += 1.0
        progress.update(step, {"loss": 2.5, "learning_rate": 3e-4, "tokens_per_second": 12_345.0})
    progress.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 4  # steps 5, 10, 15, 20: no per-step spam
    assert lines[0].startswith("train step 5/20 (25%) | loss 2.5000 | lr 3.00e-04")
    assert "tok/s 12.3k | mfu n/a | eta 0:15" in lines[0]
    assert lines[-1].startswith("train step 20/20 (100%)")


def test_progress_close_prints_the_last_step_and_disabled_is_silent():
    out = io.StringIO()
    progress = Progress(100, 10, log_every=50, file=out, enabled=True)
    progress.update(11, {"train/loss": 1.0, "train/mfu": 0.413})
    progress.close()
    assert out.getvalue() == "train step 11/100 (11%) | loss 1.0000 | mfu 41.3%\n"
    silent = io.StringIO()
    progress = Progress(10, file=silent, enabled=False)
    progress.update(10, {"loss": 1.0})
    progress.close()
    assert silent.getvalue() == ""


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_draws_a_tqdm_bar_on_a_terminal():
    out = _Terminal()
    progress = Progress(20, 5, file=out, enabled=True)
    for step in range(6, 21):
        progress.update(step, {"loss": 2.0, "learning_rate": 1e-3, "mfu": None})
    progress.close()
    final = out.getvalue().split("\r")[-1]
    assert "20/20" in final and "loss 2.0000 | lr 1.00e-03 | mfu n/a" in final


def test_progress_write_prints_a_message():
    out = io.StringIO()
    progress = Progress(10, file=out, enabled=True)
    progress.write("step 5: eval loss=1.0000")
    progress.close()
    assert out.getvalue() == "step 5: eval loss=1.0000\n"


def test_format_postfix():
    assert format_postfix({}) == "mfu n/a"
    assert format_postfix({"lr": 1e-4, "tokens_per_second": 2.5e6}) == (
        "lr 1.00e-04 | tok/s 2.5M | mfu n/a"
    )


def test_throughput_skips_the_compile_step():
    now = [0.0]
    meter = Throughput(
        flops_per_token=1e6, num_devices=2, peak_flops_per_device=1e9, clock=lambda: now[0]
    )
    assert meter.rates() == {}
    now[0] = 30.0  # the first step compiles for 30 s
    meter.step(1000)
    assert meter.rates() == {}
    for _ in range(4):
        now[0] += 0.5
        meter.step(1000)
    rates = meter.rates()
    assert rates == {"tokens_per_second": 2000.0, "steps_per_second": 2.0, "mfu": 1.0}
    now[0] += 10.0  # an evaluation
    meter.reset()
    now[0] += 1.0
    meter.step(500)
    assert meter.rates()["tokens_per_second"] == 500.0
    cpu = Throughput(peak_flops_per_device=None, flops_per_token=1e6, clock=lambda: now[0])
    cpu.step(1)
    now[0] += 1.0
    cpu.step(1)
    assert "mfu" not in cpu.rates()


def test_allocator_hint_only_for_cpu_runs_without_tcmalloc(tmp_path):
    from llm_jax.train import allocator

    big = 2 * 2**30
    assert allocator.allocator_hint("gpu", big, {}) is None
    assert (
        allocator.allocator_hint("cpu", big, {"LD_PRELOAD": "/x/libtcmalloc_minimal.so.4"}) is None
    )
    assert allocator.allocator_hint("cpu", 2**20, {}) is None  # small temporaries: no tip
    # The rule: temporaries of glibc's largest mmap threshold (32 MiB) or more get the tip,
    # e.g. configs/tiny.yaml's compiled step (184.5 MiB), which runs faster under tcmalloc.
    threshold = 32 * 2**20
    assert allocator.allocator_hint("cpu", threshold - 1, {}) is None
    assert allocator.allocator_hint("cpu", threshold, {}) is not None
    tiny = allocator.allocator_hint("cpu", int(184.5 * 2**20), {}, (str(tmp_path / "none"),))
    assert "184 MiB" in tiny or "185 MiB" in tiny
    fake = tmp_path / "libtcmalloc_minimal.so.4"
    fake.write_bytes(b"")
    assert allocator.find_tcmalloc((str(tmp_path / "none"), str(tmp_path))) == str(fake)
    tip = allocator.allocator_hint("cpu", big, {}, (str(tmp_path),))
    assert tip.endswith(f"LD_PRELOAD={fake}") and "2.0 GiB" in tip
    missing = allocator.allocator_hint("cpu", big, {}, (str(tmp_path / "none"),))
    assert "apt-get install libtcmalloc-minimal4" in missing


def test_loss_curve_smooths_only_long_runs():
    from llm_jax.train.metrics import EMA_MIN_POINTS, ema_beta

    # A short run's EMA would trail its falling loss by ~10 points, above the raw line.
    assert ema_beta(30) is None and ema_beta(EMA_MIN_POINTS - 1) is None
    assert ema_beta(EMA_MIN_POINTS) == 0.9 and ema_beta(5000) == 0.9
