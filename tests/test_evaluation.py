"""Evaluation: lm-eval on the offline tasks with the embedded model and a LoRA adapter trained
here, lm-eval's IFEval checker on hand-written responses, the agent loop, and bad input."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
from dataclasses import replace
from pathlib import Path

import pytest

from sit_core.config import load_config
from sit_core.errors import SitError
from sit_core.stages.evaluate import agent, lm_eval_runner
from sit_core.stages.evaluate.harness import SCORED_BY
from sit_core.driver import run_stage
from sit_core.store.fileio import append_jsonl, read_json

TASKS_DIR = Path(lm_eval_runner.__file__).parent / "tasks"


def _task_utils(task: str):
    spec = importlib.util.spec_from_file_location(f"sit_test_{task}_utils", TASKS_DIR / task / "utils.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def no_nltk_download(monkeypatch):
    """The checker's NLTK data must come from a package: any download attempt fails the test."""
    import nltk

    def refuse(*args, **kwargs):
        raise AssertionError(f"nltk.download{args} was called")

    monkeypatch.setattr(nltk, "download", refuse)


# ---------------------------------------------------------------------------------------
# IFEval checker


def test_ifeval_checker_on_handwritten_responses() -> None:
    utils = _task_utils("sit_ifeval_local")
    docs = {doc["prompt"].split(".")[0]: doc for doc in utils.load_dataset()["test"]}

    def strict(prompt_start: str, response: str) -> bool:
        return utils.process_results(docs[prompt_start], [response])["prompt_level_strict_acc"]

    bikes = "Describe how a bicycle gear system works without using any commas"
    assert strict(bikes, "Gears let the rider trade speed for force. A small front ring makes climbing easy.")
    assert not strict(bikes, "Gears, chains, and cogs work together.")

    water = "Describe the water cycle in fewer than 4 sentences"  # counted by NLTK's punkt model
    assert strict(water, "Water evaporates from the sea. It condenses into clouds and falls as rain.")
    assert not strict(water, "Water warms. It rises. It cools. It forms clouds. It rains. It flows back.")
    assert strict(water, "Dr. Smith studies rain. Water rises, cools and falls again.")  # "Dr." ends no sentence

    cook = "Give advice to someone learning to cook"  # two instructions: lowercase and no comma
    assert strict(cook, "start with eggs and rice and taste as you go.")
    assert not strict(cook, "start with eggs, rice and soup.")
    assert not strict(cook, "Start With Eggs and rice.")

    colours = "List two primary colours and one secondary colour"
    assert strict(colours, '```json\n{"primary": ["red", "blue"], "secondary": ["green"]}\n```')
    assert not strict(colours, "Red and blue are primary; green is secondary.")

    language = "Name a good first programming language and say why"
    assert strict(language, "I suggest python because it reads like English. Happy coding.")
    assert not strict(language, "I suggest python because it reads like English.")


def test_local_task_data_is_well_formed() -> None:
    from lm_eval.tasks.ifeval import instructions_registry

    ifeval = _task_utils("sit_ifeval_local").load_dataset()["test"]
    assert len(ifeval) >= 20
    for doc in ifeval:
        assert len(doc["instruction_id_list"]) == len(doc["kwargs"])
        assert all(i in instructions_registry.INSTRUCTION_DICT for i in doc["instruction_id_list"])
    mc = _task_utils("sit_mc_local").load_dataset()["test"]
    assert len(mc) >= 20
    assert all(0 <= doc["answer"] < len(doc["choices"]) for doc in mc)


# ---------------------------------------------------------------------------------------
# Bad input


def test_unknown_task_lists_close_matches() -> None:
    with pytest.raises(SitError) as err:
        lm_eval_runner.check_tasks(["sit_ifeval_locl"])
    assert "close matches: sit_ifeval_local" in str(err.value)


def test_hub_task_offline_names_local_set(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SitError) as err:
        lm_eval_runner.check_tasks(["sit_mc_local", "hellaswag"])
    message = str(err.value)
    assert "hellaswag" in message and "Hub" in message
    assert "sit_ifeval_local" in message and "sit_mc_local" in message


def test_only_a_task_of_lm_evals_own_makes_it_index_its_thousands(monkeypatch) -> None:
    """Our tasks are found in our folder alone; lm-eval's ~15k task files, seconds to scan, are
    indexed the first time one of its own tasks is asked for."""
    import lm_eval.tasks

    from sit_core.stages.evaluate import harness

    built = []

    class Recording(lm_eval.tasks.TaskManager):
        def __init__(self, *args, **kwargs):
            built.append("lm-eval's and ours" if kwargs.get("include_defaults", True) else "ours")
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", Recording)
    harness._index.cache_clear()
    try:
        lm_eval_runner.check_tasks(list(lm_eval_runner.LOCAL_TASKS))
        assert lm_eval_runner.is_generative("sit_ifeval_local") and not lm_eval_runner.is_generative("sit_mc_local")
        assert built == ["ours"]
        assert not lm_eval_runner.is_generative("hellaswag") and lm_eval_runner.is_generative("ifeval")
        assert built == ["ours", "lm-eval's and ours"]
    finally:
        harness._index.cache_clear()


# ---------------------------------------------------------------------------------------
# Agent evaluation


def test_agent_tools() -> None:
    assert agent.calculator("3 * (4 + 5) - 2 ** 3") == 19
    with pytest.raises(agent.ToolError):
        agent.calculator("__import__('os').system('true')")
    assert agent.convert(10, "mi", "km") == pytest.approx(16.09344)
    assert agent.convert(212, "f", "c") == pytest.approx(100)
    with pytest.raises(agent.ToolError):
        agent.convert(1, "kg", "km")
    assert agent.lookup("Gizmo", "price_usd") == 12.0
    with pytest.raises(agent.ToolError):
        agent.lookup("unobtainium", "stock")


def test_agent_tasks_are_deterministic_and_solvable() -> None:
    tasks = agent.build_tasks(10, seed=42)
    assert tasks == agent.build_tasks(10, seed=42)
    assert {t.kind for t in tasks} == {"arithmetic", "conversion", "lookup", "lookup_then_calculate",
                                       "lookup_then_convert"}
    assert agent.build_tasks(10, seed=7) != tasks


def test_agent_loop_with_scripted_replies() -> None:
    """A two-step task solved by a scripted model, then one that never uses the format."""
    task = next(t for t in agent.build_tasks(10, seed=42) if t.kind == "lookup_then_calculate")
    item = task.question.split(" of ")[1].split(" cost")[0]
    units = int(task.question.split()[2])
    script = iter([
        f'Let me look it up. {{"tool": "lookup", "args": {{"item": "{item}", "field": "price_usd"}}}}',
        '```json\n{"tool": "calculator", "args": {"expression": "' + f"{units} * {agent.INVENTORY[item]['price_usd']}" + '"}}\n```',
        f'{{"answer": {units * agent.INVENTORY[item]["price_usd"]}}}',
    ])
    seen = []

    def scripted(messages):
        seen.append(messages[-1]["content"])
        return next(script)

    good = agent.solve(task, scripted, max_steps=4)
    assert good["success"] and good["steps"] == 3 and good["valid_turns"] == 3 and good["tool_calls"] == 2
    assert seen[1].startswith("Result: ")

    bad = agent.solve(task, lambda messages: "The answer is probably 12.", max_steps=2)
    assert not bad["success"] and bad["steps"] == 2 and bad["valid_turns"] == 0
    summary = agent.summarize([good, bad])
    assert summary["success_rate"] == 0.5
    assert summary["valid_call_rate"] == pytest.approx(3 / 5)
    assert summary["mean_steps"] == 2.5


def test_agentbench_results_are_parsed(tmp_path: Path) -> None:
    """The layout AgentBench's assigner writes: outputs/<time>/<agent>/<task>/overall.json."""
    out = tmp_path / "outputs" / "2025-01-01-00-00-00" / "sit-sft" / "webshop-std"
    out.mkdir(parents=True)
    (out / "overall.json").write_text(json.dumps(
        {"total": 20, "validation": {"completed": 0.9, "agent invalid action": 0.05},
         "custom": {"reward": 0.31, "success_rate": 0.15}}))
    (out / "runs.jsonl").write_text("{}\n")
    rows = agent.parse_agentbench_outputs(tmp_path / "outputs")
    assert rows == [{"run": "2025-01-01-00-00-00", "agent": "sit-sft", "task": "webshop-std",
                     "metrics": {"total": 20.0, "validation.completed": 0.9, "validation.agent invalid action": 0.05,
                                 "custom.reward": 0.31, "custom.success_rate": 0.15}}]
    with pytest.raises(SitError):
        agent.run_agentbench(tmp_path)  # not a checkout


# ---------------------------------------------------------------------------------------
# The stage, on the embedded model and a LoRA adapter trained here


def _train_tiny_lora(base_path: Path, out_dir: Path) -> None:
    """A few optimizer steps of LoRA on two sentences: a real adapter, different from the base."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(base_path)
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                             task_type="CAUSAL_LM"))
    batch = tok(["Question: How many legs does a spider have?\nAnswer: eight",
                 "Answer in lowercase letters only and use no commas."], return_tensors="pt", padding=True)
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    for _ in range(3):
        loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        optim.step()
        optim.zero_grad()
    model.save_pretrained(out_dir)


def _held_out_inputs(run_dir: Path) -> None:
    """Kept records and preference pairs: 3 records and 2 pairs are held out by the config below."""
    topics = ["rivers", "bread", "chess", "bees", "owls", "tea"]
    append_jsonl(run_dir / "filter" / "kept.jsonl", [
        {"id": i, "instruction": f"Tell me one fact about {t}.", "response": f"People have studied {t} for centuries."}
        for i, t in enumerate(topics)])
    append_jsonl(run_dir / "preference" / "pairs.jsonl", [
        {"id": i, "prompt": [{"role": "user", "content": f"Describe {t} briefly."}],
         "chosen": [{"role": "assistant", "content": f"{t.capitalize()} are interesting."}],
         "rejected": [{"role": "assistant", "content": "No."}]} for i, t in enumerate(topics)])


@pytest.mark.slow
def test_evaluate_stage_base_and_lora(smollm2_path: Path, run_dir: Path) -> None:
    _train_tiny_lora(smollm2_path, run_dir / "sft" / "final")
    _held_out_inputs(run_dir)
    cfg = load_config(None, preset="demo", profile="cpu", overrides=[
        "evaluation.limit=2", 'evaluation.variants=["base","sft","dpo"]',
        "evaluation.agent.num_tasks=1", "evaluation.agent.max_steps=2",
        "training.validation_size=3", "training.dpo_validation_size=2", "evaluation.answer_max_tokens=8"])
    manifest = run_stage(cfg, run_dir, "evaluate")

    assert manifest["status"] == "done"
    stats = manifest["stats"]
    assert stats["variants"] == {"base": "ready", "sft": "ready", "dpo": "missing"}  # dpo reported, not dropped
    assert any(e["event"] == "variant_missing" and e["variant"] == "dpo" for e in manifest["events"])
    evaluate = run_dir / "evaluate"
    for variant in ("base", "sft"):
        result = read_json(evaluate / "lm_eval" / f"{variant}.json")
        assert set(result["results"]) == {"sit_ifeval_local", "sit_mc_local"}
        assert result["results"]["sit_mc_local"]["sample_len"] == 2
        assert "all variants in the same batches" in result[SCORED_BY]["sit_ifeval_local"]
        summary = read_json(evaluate / "agent" / f"{variant}.json")["summary"]
        assert summary["num_tasks"] == 1 and 1 <= summary["mean_steps"] <= 2
    assert not (evaluate / "lm_eval" / "dpo.json").exists()
    primary = {(r["variant"], r["task"]): r["metric"] for r in stats["tables"]["scores"]
               if r["task"] in cfg.evaluation.tasks}
    assert primary == {("base", "sit_ifeval_local"): "prompt_level_strict_acc", ("base", "sit_mc_local"): "acc",
                       ("sft", "sit_ifeval_local"): "prompt_level_strict_acc", ("sft", "sit_mc_local"): "acc"}
    with open(evaluate / "scores.csv", encoding="utf-8", newline="") as f:
        scores = {(r["variant"], r["task"], r["metric"]): r for r in csv.DictReader(f)}
    assert len([k for k in scores if k[1] in cfg.evaluation.tasks]) == 2 * (4 + 2)  # IFEval's four, MC's two
    mc = scores[("sft", "sit_mc_local", "acc")]
    assert float(mc["stderr"]) > 0 and mc["n"] == "2"  # lm-eval's standard error, kept
    assert float(mc["ci_low"]) <= float(mc["value"]) <= float(mc["ci_high"])

    # Held-out signals: 3 held-out records, 2 held-out pairs, each answered and judged against base.
    signals = {v: read_json(evaluate / "held_out" / f"{v}.json") for v in ("base", "sft")}
    for variant, data in signals.items():
        assert len(data["loss"]["values"]) == 3 and all(x > 0 for x in data["loss"]["values"])
        assert len(data["preference"]["margins"]) == 2
        assert len(data["answers"]["texts"]) == 3 and all(t <= 8 for t in data["answers"]["tokens"])
        assert data["answers"]["backend"].startswith("sit's seeded decoding loop")
    assert signals["base"]["loss"] != signals["sft"]["loss"]  # the adapter is applied
    judged = read_json(evaluate / "held_out" / "judge.json")
    assert set(judged) == {"base", "sft"} and len(judged["sft"]) == 3
    win = scores[("sft", "win_rate_vs_base", "win_rate")]
    assert 0 <= float(win["ci_low"]) <= float(win["value"]) <= float(win["ci_high"]) <= 1
    for key in (("base", "held_out", "loss"), ("sft", "held_out", "perplexity"), ("sft", "held_out_pairs", "accuracy"),
                ("sft", "answers", "mean_tokens"), ("sft", "agent", "success_rate")):
        assert key in scores, key
    with open(evaluate / "comparisons.csv", encoding="utf-8", newline="") as f:
        compared = {(r["task"], r["variant_a"], r["variant_b"]) for r in csv.DictReader(f)}
    assert {("held_out", "base", "sft"), ("win_rate_vs_base", "base", "sft"), ("sit_mc_local", "base", "sft")} <= compared

    # Cut short: the sft/sit_mc_local pair, sft's answers and their scores are lost. Only those
    # are recomputed; base's results and every other signal stay as they are.
    base_mtime = (evaluate / "lm_eval" / "base.json").stat().st_mtime_ns
    base_signals_mtime = (evaluate / "held_out" / "base.json").stat().st_mtime_ns
    sft = read_json(evaluate / "lm_eval" / "sft.json")
    del sft["results"]["sit_mc_local"]
    (evaluate / "lm_eval" / "sft.json").write_text(json.dumps(sft))
    answers = signals["sft"].pop("answers")
    (evaluate / "held_out" / "sft.json").write_text(json.dumps(signals["sft"]))
    scored = judged.pop("sft")
    (evaluate / "held_out" / "judge.json").write_text(json.dumps(judged))
    m = read_json(evaluate / "manifest.json")
    m["status"] = "partial"
    (evaluate / "manifest.json").write_text(json.dumps(m))
    before = sum(e["event"] == "task_evaluated" for e in m["events"])
    resumed = run_stage(cfg, run_dir, "evaluate")
    evaluated = [e for e in resumed["events"] if e["event"] == "task_evaluated"]
    assert len(evaluated) == before + 1 and evaluated[-1] == {**evaluated[-1], "variant": "sft", "task": "sit_mc_local"}
    assert (evaluate / "lm_eval" / "base.json").stat().st_mtime_ns == base_mtime
    assert (evaluate / "held_out" / "base.json").stat().st_mtime_ns == base_signals_mtime
    redone = [(e["variant"], e.get("signal")) for e in resumed["events"][len(m["events"]):]
              if e["event"] in ("held_out_evaluated", "answers_scored")]
    assert redone == [("sft", "answers"), ("sft", None)]
    assert read_json(evaluate / "held_out" / "sft.json")["answers"] == answers  # seeded: as the first time
    assert read_json(evaluate / "held_out" / "judge.json")["sft"] == scored
    assert resumed["stats"]["tables"]["scores"] == stats["tables"]["scores"]


@pytest.mark.slow
def test_prompt_tuning_logits_line_up(smollm2_path: Path, tmp_path: Path) -> None:
    """A prompt-tuned model's forward returns logits for its virtual tokens too; the HFLM
    subclass drops them so lm-eval scores the real positions."""
    import torch
    from peft import PromptTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32)
    get_peft_model(model, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5)).save_pretrained(tmp_path)
    lm = lm_eval_runner.load_lm(str(smollm2_path), tmp_path, batch_size=2)
    inps = torch.tensor([[1, 2, 3, 4]])
    assert lm.model(inps).logits.shape[1] == 4 + 5
    assert lm._model_call(inps).shape[1] == 4
    result = lm_eval_runner.evaluate_task(lm, "sit_mc_local", limit=2, seed=42)
    assert 0.0 <= result["results"]["sit_mc_local"]["acc,none"] <= 1.0


def test_an_evaluation_from_before_the_held_out_signals_keeps_its_benchmarks(run_dir: Path) -> None:
    """Its manifest's fingerprint lacks the held-out part: reopened under today's fingerprint as
    partial, its lm-eval results kept, so a resume computes the held-out signals only."""
    from sit_core.driver import open_stage
    from sit_core.stages import evaluate

    cfg = load_config(None, preset="demo", profile="cpu")
    older = {k: v for k, v in evaluate.fingerprint(cfg).items() if k != "held_out"}
    open_stage(cfg, run_dir, "evaluate")  # a manifest, then made to look like the older code's
    manifest = read_json(run_dir / "evaluate" / "manifest.json")
    manifest.update(fingerprint=older, config_hash="older", status="done")
    (run_dir / "evaluate" / "manifest.json").write_text(json.dumps(manifest))
    (run_dir / "evaluate" / "lm_eval").mkdir()
    (run_dir / "evaluate" / "lm_eval" / "base.json").write_text('{"results": {"sit_mc_local": {}}}')

    reopened = evaluate.check(cfg, run_dir, open_stage)
    assert reopened.manifest["status"] == "partial"
    assert reopened.manifest["fingerprint"] == evaluate.fingerprint(cfg)
    assert [e["event"] for e in reopened.manifest["events"]][-2:] == ["adopted", "resumed"]
    assert (run_dir / "evaluate" / "lm_eval" / "base.json").exists()

    other = load_config(None, preset="demo", profile="cpu", overrides=["evaluation.limit=2"])
    manifest.update(fingerprint={**older, "evaluation": other.fingerprint("evaluation")})
    (run_dir / "evaluate" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(SitError, match="different 'evaluate' configuration"):
        evaluate.check(cfg, run_dir, open_stage)  # other benchmark settings: refused as before


@pytest.mark.slow
def test_a_prompt_tuning_decodes_as_its_uncached_forward_does(smollm2_path: Path, tmp_path: Path) -> None:
    """The soft prompt goes into the KV cache once: sit's loop (agent, held-out answers, lm-eval's
    generation tasks) gives, for a left-padded batch, the tokens that greedy decoding through
    PEFT's forward without a cache gives. PEFT's generate() put it in again at every step."""
    import torch
    from peft import PeftModel, PromptTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sit_core.engine.engines import model_engine
    from sit_core.engine.sampling import Sampling, chat_prompt

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32)
    get_peft_model(model, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5)).save_pretrained(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32), tmp_path)
    prompts = [chat_prompt(tokenizer, None, q) for q in ("Name three colors.", "Write one sentence about the sea, please.")]
    new_tokens = 12

    def uncached(prompt: list[int]) -> list[int]:
        ids, out = torch.tensor([prompt]), []
        with torch.no_grad():
            for _ in range(new_tokens):
                token = int(tuned(input_ids=ids, use_cache=False).logits[0, -1].argmax())
                out.append(token)
                ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
        return out

    expected = [uncached(p) for p in prompts]
    got = model_engine(tuned, tokenizer, batch_size=2).generate(prompts, [0, 0], Sampling(0.0, 1.0, new_tokens))
    assert [c.ids == e[:len(c.ids)] for c, e in zip(got, expected)] == [True, True]


@pytest.mark.slow
def test_generation_tasks_decoded_together_answer_as_lm_evals_own_model(smollm2_path: Path, tmp_path: Path) -> None:
    """sit_ifeval_local for base and a LoRA, decoded in the same batches of sit's engine and
    scored by lm-eval from the replayed texts: every answer, and so every metric, is the one
    lm-eval's own HF model writes and scores for that variant alone."""
    from conftest import random_lora
    from sit_core.engine.engines import engine_spec, open_engine
    from sit_core.engine.models import load_tokenizer
    from sit_core.stages.evaluate import generation_tasks
    from sit_core.stages.evaluate.harness import ITEMS

    task = "sit_ifeval_local"
    adapters = {"base": None, "lora": str(random_lora(smollm2_path, tmp_path / "lora"))}
    own = {}
    for variant, adapter in adapters.items():
        lm = lm_eval_runner.load_lm(str(smollm2_path), adapter and Path(adapter), batch_size=2)
        own[variant] = lm_eval_runner.evaluate_task(lm, task, limit=2, seed=42)
    tokenizer = load_tokenizer(str(smollm2_path))
    tokenizers = dict.fromkeys(adapters, tokenizer)
    asked = {v: generation_tasks.requests(task, tokenizer, limit=2, seed=42) for v in adapters}
    assert [len(a) for a in asked.values()] == [2, 2] and "<|im_start|>user" in asked["base"][0][0]  # chat-templated

    cfg = load_config(None, preset="demo", profile="cpu")
    spec = engine_spec(cfg, str(smollm2_path), batch_size=4, adapters=(adapters["lora"],))
    engine = open_engine(replace(spec, backend="transformers"), "target")
    try:
        answers = generation_tasks.decode(engine, tokenizers, adapters, asked, max_length=8192, seeds=lambda i: i)
    finally:
        engine.close()
    for variant in adapters:
        replayed = generation_tasks.replay(task, tokenizer, answers[variant], limit=2, seed=42)
        assert replayed[ITEMS][task]["answers"] == own[variant][ITEMS][task]["answers"]
        assert replayed["results"][task] == own[variant]["results"][task]
    assert answers["lora"] != answers["base"]  # the adapter acts


@pytest.mark.slow
@pytest.mark.parametrize("isolated", [False, True], ids=["in-process", "engine-process"])
def test_variants_decoded_in_one_batch_reply_as_each_decodes_alone(smollm2_path: Path, tmp_path: Path,
                                                                   isolated: bool) -> None:
    """The evaluate stage decodes base, a LoRA and a prompt tuning in the same batches (PEFT's
    mixed-adapter batch, the soft prompt in its rows only): each variant's agent replies are
    the ones it gives decoded on its own, in this process or in the engine's."""
    import torch
    from peft import PeftModel, PromptTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from conftest import random_lora
    from sit_core.engine.engines import engine_spec, model_engine, open_engine
    from sit_core.stages.evaluate.agent import evaluate_agents

    torch.manual_seed(0)
    lora = str(random_lora(smollm2_path, tmp_path / "lora"))
    prompt_tuning = tmp_path / "prompt_tuning"
    model = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32)
    get_peft_model(model, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5)).save_pretrained(prompt_tuning)
    adapters = {"base": None, "lora": lora, "prompt_tuning": str(prompt_tuning)}
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)

    def replies(out: dict) -> list[str]:
        return [turn["reply"] for task in out["tasks"] for turn in task["turns"]]

    alone = {}
    for variant, adapter in adapters.items():
        model = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32).eval()
        model = PeftModel.from_pretrained(model, adapter).eval() if adapter else model
        alone[variant] = replies(evaluate_agents(model_engine(model, tokenizer, 2), {variant: None},
                                                 num_tasks=2, max_steps=1, seed=42)[variant])
    cfg = load_config(None, preset="demo", profile="cpu")
    spec = engine_spec(cfg, str(smollm2_path), batch_size=6, adapters=(lora, str(prompt_tuning)),
                       isolated=isolated, log_path=tmp_path / "engine.log")
    engine = open_engine(replace(spec, backend="transformers"), "target")
    try:
        together = evaluate_agents(engine, adapters, num_tasks=2, max_steps=1, seed=42)
    finally:
        engine.close()
    assert {v: replies(out) for v, out in together.items()} == alone
    assert alone["lora"] != alone["base"] and alone["prompt_tuning"] != alone["base"]  # both adapters act


@pytest.mark.slow
def test_an_engine_that_fails_beside_the_scoring_leaves_its_decoding_to_the_stage(smollm2_path: Path, run_dir: Path,
                                                                                 monkeypatch) -> None:
    """On a multi-core CPU the decoding runs in an engine process beside the scoring. When that
    engine dies, the stage records it and decodes in its own process: nothing is missing."""
    import sit_core.stages.evaluate as evaluate_stage
    from sit_core.engine.engines import EngineFailed

    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("the engine runs beside the scoring only with 2 cores or more")
    _train_tiny_lora(smollm2_path, run_dir / "sft" / "final")
    _held_out_inputs(run_dir)
    opened = evaluate_stage._decoding_engine

    def dies_when_isolated(*args, isolated: bool, **kwargs):
        if isolated:
            raise EngineFailed("the transformers engine for 'target' exited with code -9")
        return opened(*args, isolated=isolated, **kwargs)

    monkeypatch.setattr(evaluate_stage, "_decoding_engine", dies_when_isolated)
    cfg = load_config(None, preset="demo", profile="cpu", overrides=[
        "evaluation.limit=1", 'evaluation.tasks=["sit_mc_local"]', 'evaluation.variants=["base","sft"]',
        "evaluation.agent.num_tasks=1", "evaluation.agent.max_steps=1",
        "training.validation_size=3", "training.dpo_validation_size=2", "evaluation.answer_max_tokens=4"])
    manifest = run_stage(cfg, run_dir, "evaluate")

    assert manifest["status"] == "done"
    failed = [e for e in manifest["events"] if e["event"] == "engine_failed"]
    assert len(failed) == 1 and "exited with code -9" in failed[0]["reason"]
    for variant in ("base", "sft"):
        assert read_json(run_dir / "evaluate" / "agent" / f"{variant}.json")["summary"]["num_tasks"] == 1
        assert len(read_json(run_dir / "evaluate" / "held_out" / f"{variant}.json")["answers"]["texts"]) == 3
    assert set(read_json(run_dir / "evaluate" / "held_out" / "judge.json")) == {"base", "sft"}
