"""cpt.train on the tiny random Llama, CPU: learning a conditional preference, frozen base,
resume equivalence, the system prompt surviving truncation, QLoRA, config errors.

Numbers pinned here are derivable (ln 2 at step 1: a zero-init LoRA makes policy == reference)
or recorded with seed, dtype (float32) and device (CPU, one thread)."""

from __future__ import annotations

import json
import math
import os

import pyarrow as pa
import pytest
import torch
from safetensors.torch import load_file

from cpt.cluster import distributed_env_from_slurm
from cpt.config import ConfigError, ModelConfig, TrainConfig
from cpt.fitting import fit_example, prepare_rows
from cpt.models.flip import ORNATE, S_ORNATE, flip_rows
from cpt.models.tiny import tiny_model_dir
from cpt.train import latest_checkpoint, main, train_dpo

# 12 tasks for training, 6 held out
TOPICS = (  # noqa: SIM905  (one line of words reads better than 18 quoted strings)
    "lighthouse garden teapot bicycle river library violin harbor orchard clock mountain "
    "lantern meadow bridge candle forest window market"
).split()


TRAIN_ROWS = flip_rows(TOPICS[:12])
HELD_OUT_ROWS = flip_rows(TOPICS[12:], prefix="h")


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny matrices: one thread is several times faster than two on a busy 2-core machine, and
    # a fixed thread count keeps float reductions (and so resume equality) reproducible.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny() -> ModelConfig:
    tiny_model_dir("tiny")
    return ModelConfig(name="tiny", path="builtin:tiny", system_role=True)


def _completion_logp(model, tokenizer, prompt, response) -> float:
    """Sum of log-probs of the response tokens, tokenized as TRL does."""
    p_ids = tokenizer.apply_chat_template(
        prompt, add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]
    ids = tokenizer.apply_chat_template(prompt + response, tokenize=True, return_dict=True)[
        "input_ids"
    ]
    assert ids[: len(p_ids)] == p_ids
    x = torch.tensor([ids])
    logp = torch.log_softmax(model(x).logits[0, :-1].float(), -1)
    target = x[0, 1:]
    per_token = logp.gather(-1, target[:, None])[:, 0]
    return float(per_token[len(p_ids) - 1 :].sum())


@torch.no_grad()
def preference_scores(adapter_dir, rows: pa.Table) -> dict[str, float]:
    """Accuracies on `rows`: per row and per task (a task counts only if BOTH directions are right).

    `implicit_*`: DPO's implicit reward, (policy - reference) log-prob of chosen minus rejected;
    `base_*`: the base model's own log-prob comparison (what "before training" means: with a
    zero-init LoRA every implicit margin is exactly 0).
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_dir = tiny_model_dir("tiny")
    tok = AutoTokenizer.from_pretrained(base_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir)
    model.eval()
    implicit, base = {}, {}
    for r in rows.to_pylist():
        pol = [_completion_logp(model, tok, r["prompt"], r[k]) for k in ("chosen", "rejected")]
        with model.disable_adapter():
            ref = [_completion_logp(model, tok, r["prompt"], r[k]) for k in ("chosen", "rejected")]
        implicit[r["id"]] = (pol[0] - ref[0]) - (pol[1] - ref[1])
        base[r["id"]] = ref[0] - ref[1]
    out = {}
    for name, margins in (("implicit", implicit), ("base", base)):
        tasks: dict[str, list[bool]] = {}
        for rid, m in margins.items():
            tasks.setdefault(rid.rsplit("-", 1)[0], []).append(m > 0)
        out[f"{name}_row"] = sum(m > 0 for m in margins.values()) / len(margins)
        out[f"{name}_pair"] = sum(all(v) for v in tasks.values()) / len(tasks)
    return out


def learn_config(**kw) -> TrainConfig:
    base = dict(
        max_steps=32,
        learning_rate=5e-3,
        per_device_batch_size=4,
        grad_accum=1,
        warmup_ratio=0.0,
        save_steps=1000,
        seed=0,
    )
    return TrainConfig(**{**base, **kw})


# --------------------------------------------------------------------------- learning


def test_dpo_learns_conditional_preference(tiny, tmp_path):
    cfg = learn_config()
    base_params = _base_state(tiny)
    result = train_dpo(cfg, tiny, TRAIN_ROWS, tmp_path, use_cpu=True)

    # zero-init LoRA: policy == reference at step 1, so the DPO loss is -log sigmoid(0) = ln 2
    assert result.losses[0] == pytest.approx(math.log(2), abs=1e-6)
    assert result.steps == cfg.max_steps and len(result.losses) == cfg.max_steps
    assert result.losses[-1] < 0.35  # seeds 0-3 end at 0.14-0.17

    held = preference_scores(result.adapter_dir, HELD_OUT_ROWS)
    train = preference_scores(result.adapter_dir, TRAIN_ROWS)
    print(f"held-out {held}\ntrain {train}")
    # Before: the base model barely reads the system prompt, so per row it is a coin flip and
    # it almost never ranks both directions of a task right.
    assert abs(held["base_row"] - 0.5) <= 0.2
    assert held["base_pair"] <= 0.5
    # After: both directions right on tasks never seen in training.
    assert held["implicit_pair"] >= 0.95
    assert train["implicit_pair"] >= 0.95

    # the base weights did not move: only the adapter trained
    _assert_base_frozen(base_params, result.adapter_dir)


def _base_state(student: ModelConfig) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("tiny"))
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_base_frozen(before: dict[str, torch.Tensor], adapter_dir) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir("tiny"))
    model = PeftModel.from_pretrained(base, adapter_dir)
    assert (adapter_dir / "adapter_model.safetensors").is_file()
    assert not (adapter_dir / "adapter_model.bin").exists()
    names = list(load_file(adapter_dir / "adapter_model.safetensors"))
    assert names and all("lora_" in n for n in names), names[:5]
    lora_b = [
        v for k, v in load_file(adapter_dir / "adapter_model.safetensors").items() if "lora_B" in k
    ]
    assert any(float(v.abs().max()) > 0 for v in lora_b), "adapter did not train"
    after = model.get_base_model().state_dict()
    for name, value in before.items():
        key = name.replace(".weight", ".base_layer.weight")
        current = after[key] if key in after else after[name]
        torch.testing.assert_close(current, value, rtol=0, atol=0, msg=f"base param {name} changed")


# --------------------------------------------------------------------------- resume


class Killed(Exception):
    """Stands for SIGKILL in-process (a real one is in tests/test_train_deepspeed.py)."""


class _KillAfterSave:
    """Simulates a kill right after the checkpoint at `step` is complete on disk."""

    def __new__(cls, step: int):
        from transformers import TrainerCallback

        class Kill(TrainerCallback):
            def on_save(self, args, state, control, **kwargs):
                if state.global_step == step:
                    raise Killed(f"killed after checkpoint-{step}")

        return Kill()


def test_resume_equals_uninterrupted(tiny, tmp_path):
    cfg = learn_config(
        max_steps=8,
        save_steps=4,
        per_device_batch_size=1,
        grad_accum=2,
        warmup_ratio=0.25,
        lora_dropout=0.1,  # dropout: the RNG state must come back too
    )
    straight = train_dpo(cfg, tiny, TRAIN_ROWS, tmp_path / "a", use_cpu=True)

    with pytest.raises(Killed):
        train_dpo(
            cfg, tiny, TRAIN_ROWS, tmp_path / "b", use_cpu=True, callbacks=[_KillAfterSave(4)]
        )
    assert latest_checkpoint(tmp_path / "b" / "checkpoints").name == "checkpoint-4"
    assert not (tmp_path / "b" / "adapter").exists()
    resumed = train_dpo(cfg, tiny, TRAIN_ROWS, tmp_path / "b", use_cpu=True)

    assert resumed.resumed_from_step == 4 and straight.resumed_from_step is None
    assert resumed.steps == straight.steps == 8
    torch.testing.assert_close(resumed.losses, straight.losses, rtol=1e-5, atol=1e-5)
    a = load_file(straight.adapter_dir / "adapter_model.safetensors")
    b = load_file(resumed.adapter_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-5, msg=k)
    # a finished run is not trained again
    again = train_dpo(cfg, tiny, TRAIN_ROWS, tmp_path / "b", use_cpu=True)
    assert again.losses == resumed.losses and again.resumed_from_step == 4
    # the last two checkpoints are kept
    names = sorted(p.name for p in (tmp_path / "b" / "checkpoints").glob("checkpoint-*"))
    assert names == ["checkpoint-4", "checkpoint-8"]


def test_latest_checkpoint_skips_half_written_ones(tmp_path):
    # HF writes trainer_state.json last; a folder without it is a save cut short by a kill
    for step, complete in ((2, True), (10, True), (12, False)):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        if complete:
            (folder / "trainer_state.json").write_text("{}")
    assert latest_checkpoint(tmp_path).name == "checkpoint-10"  # by number, not by name
    assert latest_checkpoint(tmp_path / "missing") is None


def test_held_out_rows_are_scored_once_at_the_end(tiny, tmp_path):
    """eval_steps divides max_steps: the Trainer's own last evaluation is the summary's, not a
    second pass over the held-out rows (which cost the CPU experiment 40 minutes)."""
    from transformers import TrainerCallback

    class CountEvaluations(TrainerCallback):
        calls = 0

        def on_evaluate(self, args, state, control, **kwargs):
            CountEvaluations.calls += 1

    cfg = learn_config(max_steps=2, save_steps=2)
    train_dpo(
        cfg,
        tiny,
        TRAIN_ROWS,
        tmp_path,
        eval_rows=HELD_OUT_ROWS,
        use_cpu=True,
        callbacks=[CountEvaluations()],
    )
    assert CountEvaluations.calls == 1
    summary = json.loads((tmp_path / "train_summary.json").read_text())
    assert "eval_loss" in summary["eval"]


def test_outputs_and_metrics(tiny, tmp_path):
    import pyarrow.parquet as pq

    cfg = learn_config(max_steps=3, save_steps=2)
    result = train_dpo(cfg, tiny, TRAIN_ROWS, tmp_path, eval_rows=HELD_OUT_ROWS, use_cpu=True)
    metrics = pq.read_table(result.metrics_path)
    for col in (
        "step",
        "loss",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracies",
        "learning_rate",
        "epoch",
    ):
        assert col in metrics.column_names
    assert metrics.column("step").to_pylist() == [1, 2, 3]
    assert metrics.column("loss").to_pylist() == result.losses
    summary = json.loads((tmp_path / "train_summary.json").read_text())
    assert summary["steps"] == 3 and summary["data"]["rows"] == TRAIN_ROWS.num_rows
    assert "eval_loss" in summary["eval"]
    assert (result.adapter_dir / "tokenizer.json").is_file()
    assert not list(tmp_path.glob(".adapter*")), "temporary adapter folder left behind"
    # changed config, same folder: refused instead of resuming someone else's checkpoints
    with pytest.raises(ConfigError, match="different run"):
        train_dpo(learn_config(max_steps=4, save_steps=2), tiny, TRAIN_ROWS, tmp_path, use_cpu=True)


def test_precomputed_reference_gives_the_same_losses(tiny, tmp_path):
    # The reference is the adapter-disabled base either way; precomputing it once (TRL caches it
    # keyed by data + model hash) must not change the training trajectory.
    cfg = learn_config(max_steps=4)
    live = train_dpo(cfg, tiny, TRAIN_ROWS, tmp_path / "live", use_cpu=True)
    cfg_pre = learn_config(max_steps=4, precompute_ref_log_probs=True)
    pre = train_dpo(cfg_pre, tiny, TRAIN_ROWS, tmp_path / "pre", use_cpu=True)
    torch.testing.assert_close(pre.losses, live.losses, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- truncation


def _tokenizer(variant: str = "tiny"):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir(variant))


def _n(tok, messages, gen: bool) -> int:
    return len(
        tok.apply_chat_template(
            messages, tokenize=True, return_dict=True, add_generation_prompt=gen
        )["input_ids"]
    )


LONG_TASK = (
    "Describe, in exhaustive detail, " + " and ".join(f"the {t} at dawn" for t in TOPICS * 8) + "."
)
LONG_ANSWER = " ".join(ORNATE * 40).format(t="teapot")


@pytest.mark.parametrize("variant", ["tiny", "tiny_nosys"])
def test_system_prompt_survives_truncation(variant):
    tok = _tokenizer(variant)
    system_role = variant == "tiny"
    prompt = [{"role": "system", "content": S_ORNATE}, {"role": "user", "content": LONG_TASK}]
    chosen = [{"role": "assistant", "content": LONG_ANSWER}]
    rejected = [{"role": "assistant", "content": "Fine."}]
    assert (
        _n(
            tok,
            fit_example(
                prompt,
                chosen,
                rejected,
                tok,
                max_prompt_length=10**6,
                max_length=10**6 + 1,
                system_role=system_role,
            )[0],
            True,
        )
        > 96
    )

    p, c, r, info = fit_example(
        prompt, chosen, rejected, tok, max_prompt_length=96, max_length=160, system_role=system_role
    )
    rendered = tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
    assert S_ORNATE in rendered, "system prompt was truncated"
    assert _n(tok, p, True) <= 96 and info["prompt_tokens"] <= 96
    assert _n(tok, p, True) >= 90  # cut as little as possible
    assert info["prompt_truncated"] and info["chosen_truncated"] and not info["rejected_truncated"]
    assert _n(tok, p + c, False) <= 160 and _n(tok, p + r, False) <= 160
    assert LONG_TASK.startswith(p[-1]["content"].split("\n\n")[-1])  # the task's end is cut
    assert LONG_ANSWER.startswith(c[0]["content"]) and r == rejected
    if system_role:
        assert p[0] == {"role": "system", "content": S_ORNATE}
    else:  # folded: no system turn reaches the template (it would raise), text kept in front
        assert [m["role"] for m in p] == ["user"]
        assert p[0]["content"].startswith(S_ORNATE + "\n\n")


def test_trl_keep_start_would_drop_the_row():
    # Why cpt fits rows itself: TRL 1.16 has no max_prompt_length, and with max_length alone a
    # long prompt fills the sequence and TRL drops the row (keep_start) or, with the deprecated
    # keep_end, cuts from the left, through the system turn.
    tok = _tokenizer()
    prompt = [{"role": "system", "content": S_ORNATE}, {"role": "user", "content": LONG_TASK}]
    assert _n(tok, prompt, True) > 160
    p, _, _, _ = fit_example(
        prompt,
        [{"role": "assistant", "content": "Ok."}],
        [{"role": "assistant", "content": "No."}],
        tok,
        max_prompt_length=96,
        max_length=160,
    )
    assert _n(tok, p, True) <= 96


def test_prepare_rows_drops_rows_whose_system_prompt_cannot_fit():
    tok = _tokenizer()
    rows = flip_rows(TOPICS[:2]).to_pylist()
    rows[0]["prompt"][0]["content"] = "Be ornate. " * 200
    cfg = TrainConfig(max_prompt_length=64, max_length=128)
    out, stats = prepare_rows(pa.Table.from_pylist(rows), tok, cfg)
    assert len(out) == 3 and stats["dropped"] == 1 and stats["dropped_ids"] == [rows[0]["id"]]
    assert set(out[0]) == {"prompt", "chosen", "rejected"}  # metadata columns left out
    with pytest.raises(ValueError, match="lack column"):
        prepare_rows(pa.table({"id": ["x"]}), tok, cfg)


def test_nosys_model_trains(tmp_path):
    tiny_model_dir("tiny_nosys")
    student = ModelConfig(name="tiny_nosys", path="builtin:tiny_nosys", system_role=False)
    # the folded ornate system prompt alone takes 50 tokens, the plain one 34: with 52 only the
    # ornate rows' tasks are cut, and no row is dropped
    result = train_dpo(
        learn_config(max_steps=2, max_prompt_length=52, max_length=80),
        student,
        TRAIN_ROWS,
        tmp_path,
        use_cpu=True,
    )
    assert result.losses[0] == pytest.approx(math.log(2), abs=1e-6)
    data = json.loads((tmp_path / "train_summary.json").read_text())["data"]
    assert data["prompts_truncated"] == TRAIN_ROWS.num_rows // 2 and data["dropped"] == 0
    assert data["max_prompt_tokens"] <= 52


# --------------------------------------------------------------------------- QLoRA


def _bnb_cpu_reason() -> str | None:
    try:
        import bitsandbytes as bnb

        layer = bnb.nn.Linear4bit(64, 64, quant_type="nf4").to("cpu")  # .to() quantizes
        layer(torch.randn(2, 64))
    except Exception as exc:  # bnb without a CPU backend raises at import or first matmul
        return f"bitsandbytes cannot run 4-bit on CPU here: {type(exc).__name__}: {exc}"
    return None


@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_qlora_on_cpu(tiny, tmp_path, quantization):
    reason = _bnb_cpu_reason()
    if reason:
        pytest.skip(reason)
    cfg = learn_config(max_steps=4, quantization=quantization, learning_rate=1e-2)
    result = train_dpo(cfg, tiny, TRAIN_ROWS, tmp_path, use_cpu=True)
    assert result.losses[0] == pytest.approx(math.log(2), abs=1e-3)
    assert all(math.isfinite(x) for x in result.losses)
    summary = json.loads((tmp_path / "train_summary.json").read_text())
    assert summary["base_quantized"] == quantization  # really loaded through bitsandbytes
    tensors = load_file(result.adapter_dir / "adapter_model.safetensors")
    assert any(float(v.float().abs().max()) > 0 for k, v in tensors.items() if "lora_B" in k)


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"lora_r": 0}, "train.lora_r must be >= 1, got 0"),
        ({"lora_dropout": 1.0}, "train.lora_dropout must be in [0, 1), got 1.0"),
        ({"beta": 0}, "train.beta must be > 0, got 0"),
        ({"max_steps": 0}, "train.max_steps must be -1 (use epochs) or >= 1, got 0"),
        ({"warmup_ratio": 1.0}, "train.warmup_ratio must be in [0, 1), got 1.0"),
        (
            {"quantization": "3bit"},
            "train.quantization must be one of none, 4bit, 8bit; got '3bit'",
        ),
        (
            {"max_prompt_length": 256, "max_length": 256},
            "train.max_length must be > train.max_prompt",
        ),
        ({"target_modules": ["q_proj", "lm_head"]}, "must not contain 'lm_head'"),
        ({"save_steps": 0}, "train.save_steps must be >= 1, got 0"),
    ],
)
def test_config_errors_name_the_field(kw, message):
    with pytest.raises(ConfigError) as err:
        TrainConfig(**kw)
    assert message in str(err.value)


def test_cli_options_are_the_config_fields(tmp_path):
    # every TrainConfig field is a CLI option, dashes or underscores; a bad value stops the
    # launch before any model is loaded
    with pytest.raises(ConfigError, match=r"train\.lora_r must be >= 1, got 0"):
        main(
            [
                "--rows",
                str(tmp_path),
                "--student-path",
                "builtin:tiny",
                "--out",
                str(tmp_path / "o"),
                "--lora-r",
                "0",
                "--max_steps",
                "3",
            ]
        )
    assert not (tmp_path / "o").exists()


def test_config_reports_every_problem_at_once():
    with pytest.raises(ConfigError) as err:
        TrainConfig(lora_r=0, grad_accum=0, learning_rate=-1)
    text = str(err.value)
    assert "not well-formed" in text
    for field in ("train.lora_r", "train.grad_accum", "train.learning_rate"):
        assert field in text


def test_defaults_follow_the_reference_recipe():
    cfg = TrainConfig()
    assert (cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.beta, cfg.epochs) == (
        16,
        16,
        0.0,
        0.1,
        1.0,
    )
    assert (cfg.max_length, cfg.max_prompt_length, cfg.per_device_batch_size, cfg.grad_accum) == (
        2048,
        256,
        1,
        4,
    )
    assert (cfg.warmup_ratio, cfg.learning_rate) == (0.1, 5e-5)
    assert set(cfg.target_modules) == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }


# --------------------------------------------------------------------------- distributed env


def test_distributed_env_from_slurm(monkeypatch):
    keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    clean = {
        k: v
        for k, v in os.environ.items()
        if k not in keys and not k.startswith(("SLURM_", "SUBMITIT_"))
    }
    monkeypatch.setattr(os, "environ", clean)  # what the function exports stays in this copy
    assert distributed_env_from_slurm() == {}  # no Slurm, no launcher: single process
    os.environ.update(
        {
            "SLURM_JOB_ID": "4242",
            "SLURM_PROCID": "5",
            "SLURM_LOCALID": "1",
            "SLURM_NTASKS": "8",
            "SLURM_JOB_NUM_NODES": "2",
            "SLURM_JOB_NODELIST": "gpu[07-08],cpu01",
        }
    )
    env = distributed_env_from_slurm()
    assert env["RANK"] == "5" and env["LOCAL_RANK"] == "1" and env["WORLD_SIZE"] == "8"
    assert env["MASTER_ADDR"] == "gpu07" and env["LOCAL_WORLD_SIZE"] == "4"
    assert 20000 <= int(env["MASTER_PORT"]) <= 60000
    assert os.environ["RANK"] == "5"
    # every task of the job derives the same port; a launcher's RANK (torchrun) is left alone
    port = env["MASTER_PORT"]
    for k in keys:
        del os.environ[k]
    os.environ["SLURM_PROCID"] = "0"
    assert distributed_env_from_slurm()["MASTER_PORT"] == port
    os.environ["RANK"] = "3"
    assert distributed_env_from_slurm()["RANK"] == "3"


# --------------------------------------------------------------------------- splits


def test_held_out_tasks_never_reach_training(tmp_path):
    """A pairs folder holds both splits; neither entry (the train stage, `python -m
    cpt.train` as slurm/train.sbatch calls it) trains on a test-split row."""
    from conftest import REPO, compose

    from cpt import store
    from cpt.graph import StageContext
    from cpt.stages import train as train_stage

    train = TRAIN_ROWS.append_column("split", pa.array(["train"] * TRAIN_ROWS.num_rows))
    test = HELD_OUT_ROWS.append_column("split", pa.array(["test"] * HELD_OUT_ROWS.num_rows))
    pairs = tmp_path / "pairs"
    store.write_shard(pairs, 0, train, {})
    store.write_shard(pairs, 1, test, {})
    store.mark_done(pairs, {"key": "k", "n_shards": 2})
    steps = ["--max-steps", "1", "--per-device-batch-size", "2", "--grad-accum", "1"]
    sbatch = (REPO / "slurm" / "train.sbatch").read_text()
    assert '--rows "$PAIRS/shards" --split train' in sbatch  # the template names its split
    main(["--rows", str(pairs / "shards"), "--student-path", "builtin:tiny", "--split", "train",
          "--out", str(tmp_path / "cli"), "--cpu", *steps])  # fmt: skip
    cfg = compose(f"run_dir={tmp_path}", "train.max_steps=1", "train.per_device_batch_size=2")
    ctx = StageContext(cfg, "train", "k", tmp_path / "stage", {"pairs": pairs})
    stats = train_stage.run(ctx)
    for out in (tmp_path / "cli", tmp_path / "stage"):
        summary = json.loads((out / "train_summary.json").read_text())
        assert summary["data"]["rows"] == train.num_rows, out  # no test row trained on
    assert stats["rows"] == train.num_rows
    assert summary["eval_data"]["rows"] == test.num_rows  # the stage evaluates on them
    with pytest.raises(ValueError, match="no rows of split 'nope'"):  # the wrong split: nothing
        main(["--rows", str(pairs / "shards"), "--student-path", "builtin:tiny", "--split",
              "nope", "--out", str(tmp_path / "x"), "--cpu", *steps])  # fmt: skip


def test_the_kernels_install_hint_of_bitsandbytes_is_dropped(caplog):
    import logging

    import cpt  # noqa: F401  (installs the filter)

    bnb = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING, logger=bnb.name):
        bnb.warning(
            "Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make "
            "sure you already `pip install kernels` and the kernels >= 0.11.1",
            "No module named 'kernels'",
        )
        bnb.warning("another bitsandbytes warning")
    assert [r.getMessage() for r in caplog.records] == ["another bitsandbytes warning"]


def test_training_logs_one_short_line_per_step_in_a_log_file(caplog, capsys, monkeypatch):
    """Not a terminal (Slurm, a pipe): transformers' raw dict printer is removed and each
    logging step is one line with loss, reward accuracy and margin."""
    import logging
    from types import SimpleNamespace

    from transformers import PrinterCallback, ProgressCallback

    from cpt import train_log

    monkeypatch.setattr(train_log, "interactive", lambda: False)

    class Trainer:  # the two methods console() uses, as transformers' Trainer has them
        def __init__(self):
            self.callbacks = [PrinterCallback, ProgressCallback]

        def remove_callback(self, cb):
            self.callbacks = [c for c in self.callbacks if c is not cb]

        def add_callback(self, cb):
            self.callbacks.append(cb)

    trainer = Trainer()
    train_log.console(trainer)
    (lines,) = trainer.callbacks
    state = SimpleNamespace(is_world_process_zero=True, global_step=3, max_steps=12)
    logs = {"loss": 0.6919, "rewards/accuracies": 0.75, "rewards/margins": 0.0024}
    with caplog.at_level(logging.INFO, logger="cpt.train"):
        lines.on_log(None, state, None, logs={**logs, "learning_rate": 5e-4, "entropy": 6.9})
        lines.on_log(None, state, None, logs={"eval_loss": 0.69, "eval_rewards/accuracies": 0.5})
        lines.on_log(None, state, None, logs={"train_runtime": 543.8})
    assert [r.getMessage() for r in caplog.records] == [
        "train step 3/12: loss 0.6919, reward accuracy 0.75, margin 0.0024, lr 5.00e-04",
        "train eval at step 3/12: loss 0.6900, reward accuracy 0.50, margin nan",
    ]
    assert capsys.readouterr().out == ""  # no raw dict printed
