"""The run configuration: one pydantic v2 model tree (loaded from YAML with `--set a.b=c` overrides by
opd_tasks/config_files.py, which also writes docs/config.md).

Every field has a default that is written here and in docs/config.md. Unknown keys, wrong types and
out-of-range values raise `ConfigError` naming the key path (e.g. `rollout.temperature`) and the bad value.
This module is a leaf of opd_tasks: it imports no stage code; what needs the stage table is checked when a run
opens (`opd_tasks.stages.check_config`).

Each stage reads only its own slice of the config (`RunConfig.rollout`, `.scoring`, ...). That slice, not
the whole config, goes into the stage's cache key, so changing e.g. the update's learning rate does not
invalidate cached rollouts.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from opd_tasks.errors import ConfigError
from opd_tasks.method import METHODS
from opd_tasks.topd import DETECTORS

_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class _Strict(BaseModel):
    """Base of every config section: unknown keys are errors, assignments are validated, and no float field takes
    nan or +-inf (YAML `.nan`/`.inf`, `--set x=nan`)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_boolean_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        """No number field takes a boolean (YAML's yes/on/true would otherwise be 1)."""
        if isinstance(value, bool):
            ann = cls.model_fields[info.field_name].annotation
            kinds = {ann, *getattr(ann, "__args__", ())}
            if bool not in kinds and kinds & {int, float}:
                raise ValueError("a number is expected, not a boolean (YAML reads yes/no/on/off/true/"
                                 "false as booleans)")
        return value


class ModelRef(_Strict):
    """A model: a local directory, a hub id, or `testbed:teacher` / `testbed:student` (the embedded pair)."""

    path: str = Field(min_length=1, description="Local dir, hub id, or testbed:teacher / testbed:student.")
    revision: str | None = Field(default=None, description="Hub revision (branch, tag or commit).")
    trust_remote_code: bool = Field(default=False, description="Run model code from the hub. Off by default.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str


class TeacherContextConfig(_Strict):
    """What only the teacher sees (on-policy context distillation), before the student's prompt, wherever it runs.

    Scoring, the gates, the full-vocabulary loss, the analysis (swap, probe, bridges), the evaluation's reverse KL
    and the headroom check all condition the teacher on this context plus the student's prompt, and it scores
    exactly the student's completion tokens. Empty: the teacher sees what the student sees. It enters the prompts'
    key, and through their content every later key."""

    system: str | None = Field(default=None, description="A system prompt for the teacher (data with a chat "
                               "template); replaces the template's default system turn.")
    messages: list[ChatMessage] = Field(default_factory=list, description="Earlier chat turns only the teacher "
                                        "sees, e.g. worked examples as user/assistant pairs (chat template).")
    prefix: str = Field(default="", description="Plain text before the teacher's prompt (data without a chat "
                        "template).")

    @property
    def empty(self) -> bool:
        return self.system is None and not self.messages and not self.prefix


class ModelsConfig(_Strict):
    """The teacher and the student. A model section without `path` keeps the default model (so `--set
    models.student.dtype=bfloat16` changes the testbed student's dtype, not its identity)."""

    teacher: ModelRef = ModelRef(path="testbed:teacher")
    student: ModelRef = ModelRef(path="testbed:student")

    @model_validator(mode="before")
    @classmethod
    def _default_paths(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        filled = dict(data)
        for role in ("teacher", "student"):
            section = filled.get(role)
            if isinstance(section, dict) and "path" not in section:
                filled[role] = {"path": cls.model_fields[role].default.path} | section
        return filled


class TestbedTaskConfig(_Strict):
    """The embedded synthetic arithmetic task (docs/testbed.md)."""

    __test__ = False  # not a pytest test class

    min_digits: int = Field(default=2, ge=1, le=6, description="Fewest digits per operand.")
    max_digits: int = Field(default=3, ge=1, le=6, description="Most digits per operand.")
    operands: int = Field(default=2, ge=2, le=4, description="Numbers added per problem.")
    student_style: str = Field(default="student", description="Surface style of the student's rollouts.")
    teacher_style: str = Field(default="teacher", description="Surface style the teacher was trained on.")
    fork: Literal["none", "harmless", "consequential"] = Field(
        default="none", description="The mechanism switch (docs/testbed.md): which student habit the models have. "
        "consequential: it often stops early and answers directly (a real fork); harmless: it writes a filler at "
        "the same places (no consequence); none: neither. Picks the condition's models when models.* are the "
        "testbed defaults.")

    @model_validator(mode="after")
    def _digits_order(self) -> TestbedTaskConfig:
        if self.min_digits > self.max_digits:
            raise ValueError(f"min_digits ({self.min_digits}) must be <= max_digits ({self.max_digits})")
        return self


class DataConfig(_Strict):
    """Where prompts come from: the embedded testbed, or a dataset (local file or hub id)."""

    source: Literal["testbed", "dataset"] = "testbed"
    path: str | None = Field(default=None, description="jsonl/json/parquet/csv file, or a hub dataset id.")
    split: str = "train"
    eval_split: str | None = Field(default=None, description="Split for evaluation; None = held out of path.")
    prompt_column: str = "question"
    answer_column: str | None = Field(
        default="answer", description="The reference answers' column. None: prompt-only data (no checker, no "
        "accuracy; evaluation reports the reverse KL to the teacher and the truncated share; the headroom gate, "
        "which compares accuracies, must then be off: gates.min_headroom null).")
    chat_template: bool = Field(default=False, description="Wrap prompts with the tokenizer's chat template.")
    prompts_per_iteration: int = Field(default=32, ge=1, description="New prompts drawn each iteration.")
    eval_size: int = Field(default=100, ge=1, description="Held-out prompts used by evaluation.")
    eval_seed: int = Field(default=0, ge=0, description="Seed of the eval set's draw, independent of the run seed: "
                           "runs of any seed and method evaluate on the same problems (paired comparisons).")
    testbed: TestbedTaskConfig = TestbedTaskConfig()

    @model_validator(mode="after")
    def _path_for_dataset(self) -> DataConfig:
        if self.source == "dataset" and not self.path:
            raise ValueError("data.path is required when data.source is 'dataset'")
        return self


#: Fields of `rollout` and `scoring` that only the vllm backend reads: left out of an hf stage's cache key, so that
#: changing them never invalidates hf artifacts.
VLLM_ONLY_FIELDS = ("gpu_memory_utilization", "tensor_parallel_size", "max_model_len", "enforce_eager")


class _BackendSection(_Strict):
    """A stage section with a `backend` (rollout, scoring)."""

    key_note: ClassVar[str] = "without the vLLM-only fields under the hf backend"  # docs/stages.md

    def key_slice(self) -> dict[str, Any]:
        """This section as it goes into the stage's cache key: without the vLLM-only fields under hf."""
        out = self.model_dump(mode="json")
        if out["backend"] == "hf":
            for name in VLLM_ONLY_FIELDS:
                del out[name]
        return out


class RolloutConfig(_BackendSection):
    """Stage 1: the student samples completions with per-token log-probs (vllm: docs/scaling.md, vLLM)."""

    backend: Literal["hf", "vllm"] = Field(
        default="hf", description="hf: transformers generate (CPU or CUDA); vllm: vllm.LLM in a child process (CUDA).")
    samples_per_prompt: int = Field(default=4, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=10.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    max_new_tokens: int = Field(default=64, ge=1)
    batch_size: int = Field(default=64, ge=1, description="Sequences generated per forward batch (hf).")
    gpu_memory_utilization: float = Field(default=0.85, gt=0.0, le=1.0,
                                          description="vLLM only: share of each GPU's memory the engine may take.")
    tensor_parallel_size: int = Field(default=1, ge=1, description="vLLM only: GPUs the model is sharded over.")
    max_model_len: int | None = Field(default=None, ge=2,
                                      description="vLLM only: most prompt + completion tokens; None = the model's.")
    enforce_eager: bool = Field(default=False,
                                description="vLLM only: no torch.compile / CUDA graphs (faster start, slower decode).")


class ScoringConfig(_BackendSection):
    """Stage 2: the teacher's log-prob of each sampled token, and its top-k (vllm: docs/scaling.md, vLLM)."""

    backend: Literal["hf", "vllm"] = Field(
        default="hf", description="hf: transformers teacher forcing; vllm: prompt_logprobs (CUDA; no teacher_entropy).")
    top_k: int = Field(default=8, ge=1, le=1024, description="Teacher top-k ids/log-probs kept per token.")
    batch_size: int = Field(default=64, ge=1, description="Sequences per forward batch (hf).")
    gpu_memory_utilization: float = Field(default=0.85, gt=0.0, le=1.0,
                                          description="vLLM only: share of each GPU's memory the engine may take.")
    tensor_parallel_size: int = Field(default=1, ge=1, description="vLLM only: GPUs the model is sharded over.")
    max_model_len: int | None = Field(default=None, ge=2,
                                      description="vLLM only: most prompt + completion tokens; None = the model's.")
    enforce_eager: bool = Field(default=True,
                                description="vLLM only: no torch.compile / CUDA graphs (scoring is prefill only).")


class AnalysisConfig(_Strict):
    loss_signal: Literal["k1", "rkl_topk"] = "k1"
    high_loss_quantile: float = Field(default=0.2, gt=0.0, le=1.0, description="Top-q fraction is high-loss.")
    high_loss_threshold: float | None = Field(default=None, description="Absolute threshold; overrides q.")
    min_high_loss: float = Field(
        default=0.05, ge=0.0, description="With the quantile: a token is high-loss only if its loss signal is also at "
        "least this many nats, so a batch without teacher signal has no high-loss tokens (docs/method.md).")
    detector: Literal[tuple(DETECTORS)] = Field(  # type: ignore[valid-type]
        default="swap", description="Near-future detector: "
        + "; ".join(f"{k}: {d.description}" for k, d in DETECTORS.items()) + " (docs/method.md).")
    window: int = Field(default=8, ge=1, description="W: the student's next tokens read by window and swap.")
    probe_tokens: int = Field(default=16, ge=1, description="K: tokens each model continues in a probe.")
    probe_budget: Annotated[int, Field(ge=0)] | Literal["all"] = Field(
        default=1, description="Most probed (probe, swap) positions per rollout, highest signal first; 'all': every "
        "high-loss token.")
    probe_student: Literal["realised", "greedy"] = Field(
        default="realised", description="probe: the student's side of a probe: what it wrote after s_t (realised, "
        "the faithful form) or its greedy continuation from s_t (greedy, which hides a sampled wrong token).")
    distance: Literal["xent", "ot"] = Field(default="xent", description="probe: xent (cross log-likelihood gaps) or "
                                            "ot (optimal transport between the continuations' embeddings).")
    ot_embedding: Literal["input", "hidden"] = Field(
        default="input", description="probe with ot: input token embeddings (paraphrases close, digits apart) or "
        "the student's last-layer states at the continuation tokens (mostly its next-token prediction).")
    delta: float = Field(default=0.0, description="Divergence threshold for the divergent regime (D_t >= delta); "
                         "its scale depends on the detector (docs/method.md).")
    delta_mode: Literal["absolute", "quantile"] = Field(
        default="absolute", description="absolute: delta is the threshold; quantile: delta is a quantile of D_t.")
    min_delta: float | None = Field(
        default=None, description="With delta_mode quantile: the least delta, in the detector's D_t units (None: "
        "no floor; D_t's scale is the detector's, so calibrate it on pilot seeds: docs/method.md).")
    batch_size: int = Field(default=256, ge=1, description="Sequences per block: the detector runs block by block "
                            "(a shard holds whole blocks), and within a block this many sequences or probe prefixes "
                            "per forward batch.")


#: Keys that moved to the `topd:` section (issue 15): an old config that still sets one gets an error naming the new
#: key instead of being silently read differently.
MOVED_KEYS = {"update.lambda_s": "topd.surface_weight", "update.alpha": "topd.spread_weight",
              "update.gamma": "topd.spread_decay and topd.bridge_decay", "update.horizon": "topd.spread_horizon",
              "update.beta": "topd.bridge_weight"}


class UpdateConfig(_Strict):
    """The student update: OPD loss and optimizer (TOPD's weights are under `topd`; docs/method.md)."""

    @model_validator(mode="before")
    @classmethod
    def _moved_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            moved = [f"update.{k} moved to {MOVED_KEYS[f'update.{k}']}" for k in data if f"update.{k}" in MOVED_KEYS]
            if moved:
                raise ValueError("; ".join(moved))
        return data

    loss: Literal["pg", "topk_rkl", "full_rkl"] = Field(
        default="pg", description="pg: policy gradient on -k1; topk_rkl / full_rkl: supervised reverse KL.")
    clip_ratio: float | None = Field(default=0.2, gt=0.0, description="PPO clip of the IS ratio (pg); None = off.")
    old_logprobs: Literal["recompute", "sampler"] = Field(
        default="recompute", description="The old log-probs of the pg ratio and advantage. recompute: the trainer's "
        "own, its model and dtype before the first step (what TRL and verl do); sampler: the rollout's sampling "
        "log-probs (vLLM, bf16 generate), an explicit importance-sampling correction for the sampler/trainer "
        "mismatch. The update's old_logprobs table records both.")
    min_signal: float | None = Field(
        default=1e-3, ge=0.0, description="No signal, no update: when the batch's mean |k1| (and, with an analysis, "
        "its mean top-k reverse KL) is below this many nats, the update is skipped and the checkpoint carries the "
        "student forward unchanged; None: always train (docs/method.md).")
    learning_rate: float = Field(default=1e-4, gt=0.0, le=1.0)
    weight_decay: float = Field(default=0.0, ge=0.0)
    max_grad_norm: float = Field(default=1.0, gt=0.0)
    micro_batch_size: int = Field(default=32, ge=1)
    grad_accumulation: int = Field(default=1, ge=1)
    epochs: int = Field(default=1, ge=1, description="Passes over one iteration's rollouts.")
    order_seed: int | None = Field(default=None, ge=0, description="Seed of the order the sequences are trained in; "
                                   "None = the run's seed. Another value is a pure training-noise replicate of a run.")
    bf16: bool = Field(default=True, description="bf16 autocast on GPU (ignored on CPU).")
    optimizer_state: Literal["float32", "bfloat16"] = Field(
        default="float32", description="The dtype each checkpoint stores AdamW's moments in. bfloat16 halves the "
        "state, the largest part of a checkpoint (for a 135M model 1.03 of 1.55 GB); the next update continues "
        "from the rounded moments (8 bits of mantissa, loaded back in the parameters' dtype), so a chain of "
        "updates differs from float32's by that rounding.")
    world_size: int = Field(
        default=1, ge=1, le=1024, description="Processes the update trains in (torch.distributed, FSDP2 "
        "`fully_shard`, launched with torchrun as a child of the stage): one per GPU, NCCL on CUDA, gloo on the CPU. "
        "1 = in the stage's own process. Checkpoints resume on any world size (docs/scaling.md).")

    key_note: ClassVar[str] = "with world_size only above 1, optimizer_state only when not float32"  # docs/stages.md

    def key_slice(self) -> dict[str, Any]:
        """This section as it goes into the update's cache key: `world_size` only above 1 (N processes agree with
        one within float tolerance, not bit for bit; one process computes what it did before the field existed,
        so its keys, and every cache made before, stay valid); `optimizer_state` likewise only when it is not
        float32, what every checkpoint stored before the field existed."""
        out = self.model_dump(mode="json")
        if out["world_size"] == 1:
            del out["world_size"]
        if out["optimizer_state"] == "float32":
            del out["optimizer_state"]
        return out


class TopdConfig(_Strict):
    """TOPD's token weights and bridge; `method` picks which apply (opd: none, opd_suppress: surface_weight, topd: all).

    The methods' switches are in opd_tasks/method.py; docs/method.md says which values are the paper's."""

    surface_weight: float = Field(default=0.0, ge=0.0, description="Weight of a surface token (high loss, "
                                  "no near-future divergence); 0 suppresses it. The paper's lambda_s.")
    spread_weight: float = Field(default=0.5, ge=0.0, description="Extra weight spread_weight * spread_decay^j "
                                 "on tokens t..t+H after a divergent token t. The paper's alpha.")
    spread_decay: float = Field(default=0.8, ge=0.0, le=1.0, description="Decay of the spread weight per token "
                                "(gamma).")
    spread_horizon: int = Field(default=4, ge=0, description="H: tokens after a divergent one that get extra "
                                "weight.")
    bridge_weight: float = Field(default=0.1, ge=0.0, description="Weight of the bridge loss (the student follows "
                                 "the teacher's continuation at divergent positions); 0 turns it off. beta.")
    bridge_decay: float = Field(default=0.8, ge=0.0, le=1.0, description="Decay of the bridge loss per "
                                "continuation token (gamma).")


class BaselinesConfig(_Strict):
    """The baselines a reviewer asks for (opd_tasks/method.py): opd_return and opd_matched; no detector."""

    return_horizon: int = Field(default=4, ge=0, description="opd_return: H, the next tokens whose k1 enter A_t "
                                "(TOPD's spread_horizon by default).")
    return_decay: float = Field(default=0.8, ge=0.0, le=1.0, description="opd_return: the decay of the return "
                                "(TOPD's spread_decay by default).")
    compute_factor: float = Field(default=1.5, ge=1.0, description="opd_matched: samples per prompt x this: TOPD's "
                                  "cost over OPD's, measured with `python -m bench testbed` (docs/benchmarks.md).")


class EvaluationConfig(_Strict):
    """Stage 5: answers to the held-out prompts; accuracy is per sample (pass@k beside it when pass_k > 1).

    Accuracy is the share of correct samples: with pass_k > 1, the mean over each prompt's k samples."""

    greedy: bool = True
    pass_k: int = Field(default=1, ge=1, description="Samples per prompt (sampled at temperature 1 when > 1).")
    max_new_tokens: int = Field(default=64, ge=1)
    batch_size: int = Field(default=100, ge=1)

    @property
    def sampled(self) -> bool:
        """Whether the answers are sampled (temperature 1), not greedy: with pass_k > 1 or greedy off."""
        return self.pass_k > 1 or not self.greedy


class GatesConfig(_Strict):
    """Quality gates checked after teacher scoring; a failed gate stops the iteration before the update."""

    enabled: bool = Field(default=True, description="Run the gates stage (reported in its artifact).")
    max_truncated: float | None = Field(default=0.5, ge=0.0, le=1.0,
                                        description="Most rollouts allowed to hit max_new_tokens (EOS mismatch?).")
    min_topk_coverage: float | None = Field(default=0.5, ge=0.0, le=1.0,
                                            description="Least share of sampled tokens in the teacher's top-k.")
    max_logprob_drift: float | None = Field(default=0.05, ge=0.0,
                                            description="Most mean |sampling - recomputed| student log-prob.")
    max_teacher_repeat_diff: float | None = Field(default=1e-3, ge=0.0,
                                                  description="Most |diff| of teacher log-probs on a rescore, with "
                                                  "the teacher in float32.")
    max_teacher_repeat_diff_16bit: float | None = Field(
        default=0.5, ge=0.0, description="The same limit with the teacher in bfloat16 or float16, where kernels that "
        "depend on the batch's shape differ by more than float32's (opd_tasks/stages/gates.py says why 0.5).")
    min_headroom: float | None = Field(
        default=0.05, ge=-1.0, le=1.0, description="Before the first update, the teacher (with its context) must "
        "beat the initial student's eval accuracy by this much (0.05: 5 points), else the run stops: distilling "
        "toward a teacher that is not better wastes the run. None (or gates.enabled false): not checked, and the "
        "teacher not evaluated.")
    sample_sequences: int = Field(default=32, ge=1, description="Rollouts re-scored for the last two gates.")
    batch_size: int = Field(default=16, ge=1, description="Sequences per forward batch of the two re-scores.")

    @property
    def checks_headroom(self) -> bool:
        """Whether the run evaluates the teacher for the headroom gate (min_headroom, with the gates on)."""
        return self.enabled and self.min_headroom is not None


class FaultConfig(_Strict):
    """Fault injection for tests and drills: the stage fails once (a TransientError) at that iteration."""

    stage: str | None = Field(default=None, description="Stage to fail once (a stage name, docs/stages.md); "
                              "None = off (the default).")
    iteration: int = Field(default=0, ge=0, description="Iteration at which the stage fails.")
    shard: int | None = Field(default=None, ge=0, description="With the stage in shards "
                              "(orchestration.shards): the shard that fails, alone; None = the stage itself.")


#: The flow that runs one stage (flows/stage.py); its deployments are named by `stage_deployment`.
STAGE_FLOW = "opd-stage"

_STAGE_DEPLOYMENT = re.compile(r"^opd-stage/[A-Za-z0-9_.-]*\{stage\}[A-Za-z0-9_.-]*$")


class OrchestrationConfig(_Strict):
    """Prefect settings of the stages (not part of any cache key)."""

    retries: int = Field(default=2, ge=0, le=20, description="Retries of a failed stage (transient errors only).")
    retry_delay_seconds: float = Field(default=5.0, ge=0.0, description="Base of the exponential backoff.")
    concurrency_tag: str = Field(default="gpu",
                                 description="Tag on GPU stages, once a Prefect concurrency limit on it exists.")
    stage_runner: Literal["inline", "deployment"] = Field(
        default="inline", description="inline: every stage runs in the distill flow's process; deployment: each GPU "
        "stage is a flow run of its own deployment (opd deploy-stages), started with run_deployment "
        "(docs/scaling.md).")
    stage_deployment: str = Field(
        default="opd-stage/{stage}", description="deployment runner: the deployment of each GPU stage, "
        "'opd-stage/NAME' with {stage} replaced by rollout, score, gates, analyze, update or evaluate.")
    stage_poll_seconds: float = Field(default=2.0, gt=0.0, le=300.0,
                                      description="deployment runner: how often a stage's flow run is polled.")
    shards: int = Field(
        default=1, ge=1, le=4096, description="Shards of each row-parallel stage (rollout, score, analyze, "
        "evaluate): its rows split into this many parts on batch boundaries (under Prefect each its own task run, "
        "inline in a pool of shard_processes processes, or a flow run of the stage's deployment; the plain driver "
        "computes them in turn), merged into one artifact whose bytes, with the hf backend, do not depend on the "
        "number (docs/scaling.md). 1 = no parts.")
    stage_shards: dict[str, Annotated[int, Field(ge=1, le=4096)]] = Field(
        default_factory=dict, description="Shards per stage, e.g. {rollout: 8, score: 4}; overrides `shards` there.")
    shard_processes: int | None = Field(
        default=None, ge=1, le=256, description="inline runner: processes a stage's shards run in at once (each "
        "loads its own models); None = the largest number of shards of any stage.")

    @field_validator("stage_deployment")
    @classmethod
    def _deployment_template(cls, v: str) -> str:
        if not _STAGE_DEPLOYMENT.match(v) or v.count("{stage}") != 1:
            raise ValueError(f"must be '{STAGE_FLOW}/NAME' where NAME holds {{stage}} once and otherwise only "
                             "letters, digits, '_', '.', '-' (e.g. 'opd-stage/{stage}' or 'opd-stage/{stage}-a100')")
        return v


class RunConfig(_Strict):
    """One distillation run: models, data and every stage's settings."""

    name: str = Field(default="testbed", description="Run name: letters, digits, '_', '.', '-'.")
    root: str | None = Field(default=None, description="Storage root; default $OPD_HOME or ./.opd")
    remote: str | None = Field(
        default=None, description="fsspec URI artifacts are mirrored to (s3://, gs://, file://...); "
        "default $OPD_REMOTE, else none (docs/scaling.md).",
    )
    seed: int = Field(default=0, ge=0, description="Seed of prompt sampling, generation and training.")
    iterations: int = Field(default=3, ge=1, description="OPD iterations (rollout -> ... -> evaluate) to run.")
    arm: str | None = Field(default=None, description="The label reports group this run under (an experiment's "
                            "arm, e.g. topd-oracle); None: the method. A label only: in no cache key.")
    method: Literal[tuple(METHODS)] = Field(  # type: ignore[valid-type]
        default="topd", description="; ".join(f"{m.name}: {m.description}" for m in METHODS.values()) + ".",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(default="auto", description="auto = cuda if available, else cpu.")
    models: ModelsConfig = ModelsConfig()
    teacher_context: TeacherContextConfig = TeacherContextConfig()
    data: DataConfig = DataConfig()
    rollout: RolloutConfig = RolloutConfig()
    scoring: ScoringConfig = ScoringConfig()
    analysis: AnalysisConfig = AnalysisConfig()
    update: UpdateConfig = UpdateConfig()
    topd: TopdConfig = TopdConfig()
    baselines: BaselinesConfig = BaselinesConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    gates: GatesConfig = GatesConfig()
    orchestration: OrchestrationConfig = OrchestrationConfig()
    fault: FaultConfig = FaultConfig()

    @model_validator(mode="after")
    def _fork_models(self) -> RunConfig:
        """`data.testbed.fork` picks its condition's models in place of the testbed defaults (never a model the
        config names itself)."""
        fork = self.data.testbed.fork
        if self.data.source == "testbed" and fork != "none":
            if self.models.teacher.path == "testbed:teacher":
                self.models.teacher = self.models.teacher.model_copy(update={"path": "testbed:teacher-fork"})
            if self.models.student.path == "testbed:student":
                self.models.student = self.models.student.model_copy(update={"path": f"testbed:student-{fork}"})
        return self

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if not _RUN_NAME.match(v) or ".." in v:
            raise ValueError(
                f"run name {v!r} must be 1-128 characters of letters, digits, '_', '.', '-', "
                "start with a letter or digit, and contain no path separators or '..'"
            )
        return v

    @field_validator("remote")
    @classmethod
    def _remote_uri(cls, v: str | None) -> str | None:
        from storage.remote import check_remote_uri

        if v is None:
            return None
        try:
            return check_remote_uri(v)
        except ConfigError as e:
            raise ValueError(str(e)) from None

    def resolved_root(self) -> Path:
        """The storage root: `root` from the config, else $OPD_HOME, else ./.opd (DESIGN.md section 3)."""
        from storage.layout import default_root

        return Path(self.root).expanduser() if self.root else default_root()

    def resolved_remote(self) -> str | None:
        """The remote mirror: `remote` from the config, else $OPD_REMOTE, else None (local storage only)."""
        from storage.remote import default_remote

        return self.remote if self.remote else default_remote()
