"""Knowledge distillation: a frozen teacher's softened distribution as a training target.

    loss = a_kd * T^2 * KL(teacher_T || student_T) + a_lm * CE(labels) + a_cos * (1 - cos)

with `teacher_T = softmax(teacher_logits / T)` (Hinton et al. 2015; the T^2 keeps the soft
term's gradient scale independent of T). The α form sets a_kd = α, a_lm = 1 − α; the
DistilBERT preset (Sanh et al. 2019) sets a_kd = 5.0, a_lm = 2.0, a_cos = 1.0 with T = 2,
the cosine pulling the student's final hidden states towards the teacher's.

A run distils when `train.teacher` names a teacher (one of our checkpoints or a Hugging Face
folder); its data objective (clm, instruct or mlm) stays the student's own, which is what
the held-out perplexity measures. The teacher runs inside the same jitted train step,
frozen: its parameters are a separate, non-donated argument that no gradient is taken of,
and its logits exist only for the micro-batch being processed (gradient accumulation scans
micro-batches, so the [B, T, V] teacher logits are never those of the whole batch).

Shape letters: B batch, T length, V vocab, D model width, L layers.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float

from llm_jax import ops
from llm_jax.models import build
from llm_jax.models.config import ModelConfig

if TYPE_CHECKING:
    from jax.sharding import Mesh

    from llm_jax.finetune.base import Base
    from llm_jax.train.config import TrainConfig

# Student objectives a teacher can distil into, and the teacher family each needs.
OBJECTIVE_FAMILY = {"clm": "gpt", "instruct": "gpt", "mlm": "bert"}
PRESETS = ("none", "distilbert")
INITS = ("none", "alternate")


@jax.named_call
def distill_kl(
    student_logits: Float[Array, "B T V"],
    teacher_logits: Float[Array, "B T V"],
    weights: Float[Array, "B T"],
    temperature: float,
) -> tuple[Float[Array, ""], Float[Array, ""]]:
    """(sum, count) of KL(softmax(teacher / T) || softmax(student / T)) over the tokens.

    Computed in float32 whatever the logits' dtype. Not scaled by T^2 (the weights are the
    caller's). The teacher side carries no gradient.

    Args:
      student_logits, teacher_logits: [B, T, V] (same vocabulary).
      weights: [B, T], 0 on tokens that do not count.
      temperature: T > 0.

    Returns:
      sum over tokens of weight * KL, and the sum of the weights.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {student_logits.shape} and teacher logits {teacher_logits.shape} "
            "differ; the two models need the same vocabulary."
        )
    t = jnp.float32(temperature)
    log_ps = jax.nn.log_softmax(student_logits.astype(jnp.float32) / t, axis=-1)  # [B, T, V]
    log_pt = jax.nn.log_softmax(
        jax.lax.stop_gradient(teacher_logits).astype(jnp.float32) / t, axis=-1
    )
    kl = jnp.sum(jnp.exp(log_pt) * (log_pt - log_ps), axis=-1)  # [B, T]
    w = weights.astype(jnp.float32)
    return jnp.sum(kl * w), jnp.sum(w)


def hidden_cosine(
    student: Float[Array, "B T D"], teacher: Float[Array, "B T D"], weights: Float[Array, "B T"]
) -> tuple[Float[Array, ""], Float[Array, ""]]:
    """(sum, count) of 1 − cos(student, teacher) per token, weighted (DistilBERT's L_cos)."""
    s, t = student.astype(jnp.float32), jax.lax.stop_gradient(teacher).astype(jnp.float32)
    eps = jnp.float32(1e-8)
    cos = jnp.sum(s * t, -1) / jnp.maximum(
        jnp.linalg.norm(s, axis=-1) * jnp.linalg.norm(t, axis=-1), eps
    )  # [B, T]
    w = weights.astype(jnp.float32)
    return jnp.sum((1.0 - cos) * w), jnp.sum(w)


def _hidden_and_logits(model, batch: dict[str, jax.Array], rng, objective: str):
    """Final hidden states [B, T, D] and vocabulary logits [B, T, V] of one forward."""
    if objective == "mlm":
        hidden = model.encode(
            batch["tokens"],
            token_type_ids=batch.get("token_type_ids"),
            segment_ids=batch.get("segment_ids"),
            positions=batch.get("positions"),
            dropout_rng=rng,
        )
        return hidden, model.mlm_logits(hidden)
    hidden, _ = model.features(
        batch["tokens"],
        positions=batch.get("positions"),
        segment_ids=batch.get("segment_ids"),
        dropout_rng=rng,
    )
    return hidden, model.logits(hidden)


def _real_tokens(batch: dict[str, jax.Array]) -> jax.Array:
    """[B, T] 1 on real (non-padding) tokens: where the hidden-state cosine counts."""
    seg = batch.get("segment_ids")
    if seg is None:
        return jnp.ones(batch["tokens"].shape, jnp.float32)
    return (seg != 0).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class Distillation:
    """How a student learns from its teacher; used by the train step.

    Attributes:
      teacher: the teacher's graph (`nnx.split` of its model); its parameters come into
        the step as a separate argument.
      objective: the student's data objective (clm, instruct or mlm).
      main_loss: the objective's label loss ("lm" or "mlm").
      temperature: T.
      weights: loss name -> its weight in the total (main loss, "kd", "cos", "nsp").
    """

    teacher: nnx.GraphDef
    objective: str
    main_loss: str
    temperature: float
    weights: dict[str, float]

    @property
    def cosine(self) -> bool:
        return self.weights.get("cos", 0.0) > 0

    def counts(self, counts: dict[str, jax.Array], batch: dict[str, jax.Array]):
        """The objective's counts plus those of the distillation terms."""
        extra = {"kd": counts[self.main_loss]}
        if self.cosine:
            extra["cos"] = jnp.sum(_real_tokens(batch))
        return {**counts, **extra}

    def losses(self, model, teacher_params, batch, rng, lc) -> dict[str, tuple[Any, Any]]:
        """{name: (sum, count)}: the label loss, "kd" (KL, unscaled), "cos", "nsp"."""
        teacher = nnx.merge(self.teacher, jax.lax.stop_gradient(teacher_params))
        t_hidden, t_logits = _hidden_and_logits(teacher, batch, None, self.objective)
        hidden, logits = _hidden_and_logits(model, batch, rng, self.objective)
        weights = batch["weights"]
        losses = {
            self.main_loss: ops.cross_entropy(
                logits,
                batch["targets"],
                weights,
                label_smoothing=lc.label_smoothing,
                z_loss=lc.z_loss,
            ),
            "kd": distill_kl(logits, t_logits, weights, self.temperature),
        }
        if self.cosine:
            losses["cos"] = hidden_cosine(hidden, t_hidden, _real_tokens(batch))
        if self.objective == "mlm" and getattr(model, "nsp_head", None) and "nsp_labels" in batch:
            nsp = model.nsp_logits(model.pool(hidden))
            losses["nsp"] = ops.cross_entropy(nsp, batch["nsp_labels"], batch["nsp_weights"])
        return losses

    def total(self, losses, counts) -> jax.Array:
        """Σ weight · sum / count over the losses (unlisted losses weigh 1)."""
        return sum(
            self.weights.get(k, 1.0) * s / jnp.maximum(counts[k], 1.0)
            for k, (s, _) in losses.items()
        )


def loss_weights(tc: TrainConfig, main_loss: str) -> dict[str, float]:
    """The weights of `tc`'s recipe: α form, or the DistilBERT preset (5.0 / 2.0 / 1.0)."""
    t2 = tc.distill_temperature**2
    if tc.distill_preset == "distilbert":
        return {"kd": 5.0 * t2, main_loss: 2.0, "cos": 1.0}
    return {
        "kd": tc.distill_alpha * t2,
        main_loss: 1.0 - tc.distill_alpha,
        "cos": tc.distill_cosine,
    }


def check_teacher(student: ModelConfig, teacher: ModelConfig, objective: str, cosine: bool) -> None:
    """ValueError (naming the fix) unless `teacher` can teach `student` on `objective`."""
    family = OBJECTIVE_FAMILY.get(objective)
    if family is None:
        raise ValueError(
            f"distillation (train.teacher) needs data.objective in {sorted(OBJECTIVE_FAMILY)}; "
            f"got {objective!r}."
        )
    for who, cfg in (("teacher", teacher), ("student", student)):
        if cfg.family != family:
            raise ValueError(
                f"objective {objective!r} distils a {family} model, but the {who} is a "
                f"{cfg.family}; use a {family} {who}."
            )
    if teacher.vocab_size != student.vocab_size:
        raise ValueError(
            f"the teacher's vocabulary has {teacher.vocab_size} ids but the student's "
            f"{student.vocab_size}: distillation compares distributions over one vocabulary. "
            "Train the student with the teacher's tokenizer (data.tokenizer_path = the "
            "teacher's tokenizer folder) and model.vocab_size equal to the teacher's."
        )
    if cosine and teacher.d_model != student.d_model:
        raise ValueError(
            f"the hidden-state cosine needs equal widths; teacher d_model={teacher.d_model}, "
            f"student d_model={student.d_model}. Set train.distill_cosine=0 (or preset none)."
        )


def read_teacher(path: str) -> tuple[ModelConfig, dict[str, Any]]:
    """(config, params as NumPy) of a teacher: one of our checkpoints or an HF folder."""
    base = _load_teacher(path)
    return base.config, base.params


def _load_teacher(path: str, step: int | None = None) -> Base:
    """The teacher as a fine-tuning `Base`: config, params and fingerprint."""
    from llm_jax.finetune.base import load_base
    from llm_jax.finetune.config import InitConfig

    folder = Path(path)
    if not folder.exists():
        raise ValueError(f"train.teacher={path}: no such folder; give a run or HF folder.")
    is_hf = (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))
    init = InitConfig(from_hf=path) if is_hf else InitConfig(from_checkpoint=path, step=step)
    try:
        return load_base(init)
    except ValueError as e:
        raise ValueError(str(e).replace("init.from_", "train.teacher (from_")) from None


def resumed_teacher(path: str, recorded: dict[str, Any]) -> Base:
    """The teacher of a resumed run, checked against the one its start recorded.

    Args:
      path: `train.teacher` now.
      recorded: the teacher's `Base.reference()` from the run's config.json. A checkpoint
        teacher read from the same folder is read at the recorded step, so a teacher run
        that trained on meanwhile still teaches with the step it started with.

    Raises:
      ValueError: the teacher is gone or is another model (fingerprint), naming the fix.
    """
    from llm_jax.finetune.base import check_fingerprint

    source = recorded.get("from_checkpoint") or recorded.get("from_hf")
    at = "" if recorded.get("step") is None else f", step {recorded['step']}"
    fix = (
        f"a resumed distillation needs the teacher it started with ({source}{at}): point "
        "train.teacher back to it, or start a new workdir."
    )
    same_folder = str(Path(path).absolute()) == source
    step = recorded.get("step") if same_folder and recorded.get("from_checkpoint") else None
    try:
        base = _load_teacher(path, step)
    except ValueError as e:
        raise ValueError(f"{e} This run's teacher is gone: {fix}") from None
    check_fingerprint(recorded, base, what="the teacher", fix=fix)
    return base


@dataclasses.dataclass(frozen=True)
class Teacher:
    """A teacher on the mesh: what `compile_steps` passes to the step.

    Attributes:
      distillation: the recipe and the teacher's graph.
      params: its parameters, placed in `sharding`.
      sharding, abstract: their NamedShardings and ShapeDtypeStructs.
      config: the teacher's model config.
      host_params: the parameters as NumPy (student initialisation reads them).
      reference: what the run records of it (`Base.reference()`: folder, step,
        fingerprint), so that a resumed run checks it distils from the same teacher.
    """

    distillation: Distillation
    params: Any
    sharding: Any
    abstract: Any
    config: ModelConfig
    host_params: dict[str, Any]
    reference: dict[str, Any] = dataclasses.field(default_factory=dict)


def prepare_teacher(
    tc: TrainConfig,
    student: ModelConfig,
    objective: str,
    mesh: Mesh,
    rules,
    recorded: dict[str, Any] | None = None,
):
    """Read, check and place the teacher `tc.teacher` names (before any compilation);
    `recorded` is the teacher a resumed run started with (see `resumed_teacher`)."""
    from llm_jax.data.objectives import objective_spec
    from llm_jax.parallel.mesh import logical_axes, logical_to_sharding

    base = resumed_teacher(tc.teacher, recorded) if recorded else _load_teacher(tc.teacher)
    cfg, params = base.config, base.params
    main = objective_spec(objective).main_loss
    weights = loss_weights(tc, main)
    check_teacher(student, cfg, objective, weights.get("cos", 0.0) > 0)
    cfg = cfg.replace(dropout_rate=0.0, attention_dropout_rate=0.0)
    abstract_model = nnx.eval_shape(lambda: build(cfg, rngs=nnx.Rngs(0)))
    graphdef, abstract = nnx.split(abstract_model)
    abstract = nnx.to_pure_dict(abstract)
    sharding = logical_to_sharding(abstract, logical_axes(abstract_model), mesh, rules)
    placed = jax.device_put(params, sharding)
    distillation = Distillation(graphdef, objective, main, tc.distill_temperature, weights)
    abstract = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), placed, sharding
    )
    return Teacher(distillation, placed, sharding, abstract, cfg, params, base.reference())


def layers_from_teacher(
    student: ModelConfig, teacher: ModelConfig, teacher_params: dict[str, Any], fresh: dict
) -> dict[str, Any]:
    """Student parameters from the teacher's (DistilBERT's initialisation): every leaf the
    two share by shape is copied, and student layer i takes teacher layer i·L_t // L_s
    (every other layer when the student has half the layers).

    Args:
      student, teacher: the configs; widths must match.
      teacher_params: the teacher's parameter tree (NumPy).
      fresh: the student's freshly initialised tree (shapes and the leaves to keep).

    Returns:
      The student's parameter tree.

    Raises:
      ValueError: the widths differ, or the student is deeper than the teacher.
    """
    if student.num_layers > teacher.num_layers or student.d_model != teacher.d_model:
        raise ValueError(
            f"train.distill_init=alternate copies teacher layers: the student needs "
            f"num_layers <= {teacher.num_layers} and d_model == {teacher.d_model} (it has "
            f"{student.num_layers}, {student.d_model}); use distill_init=none."
        )
    index = np.arange(student.num_layers) * teacher.num_layers // student.num_layers

    def take(path, x):
        keys = [getattr(k, "key", k) for k in path]
        t = teacher_params
        for k in keys:
            if not isinstance(t, dict) or k not in t:
                return x
            t = t[k]
        t = np.asarray(t)
        if keys[0] == "layers" and t.shape[1:] == x.shape[1:]:
            return t[index].astype(x.dtype)  # [L_t, ...] -> [L_s, ...]
        return t.astype(x.dtype) if t.shape == x.shape else x

    return jax.tree_util.tree_map_with_path(take, fresh)
