"""Agent evaluation: multi-step tool use, offline, with verifiable answers.

The model gets a task and three tools (a calculator, a unit converter, and a lookup in a
local inventory table). It must call them in a stated JSON format; we run each call and
feed the result back, until it replies with a final answer or runs out of steps. Some
tasks need one tool, some need two in a row (look a value up, then compute with it).

Measured per variant:
- success_rate: final answer within 1% of the true value;
- valid_call_rate: share of model turns that were a well-formed tool call or final answer;
- mean_steps: model turns per task.

Tasks are generated from templates with numbers drawn from (seed, "agent", index), so every
variant gets exactly the same tasks and a rerun gets the same ones again.

AgentBench (THUDM/AgentBench) can run as well when `evaluation.agent.agentbench_path`
points at a checkout; see `run_agentbench`.
"""

from __future__ import annotations

import ast
import json
import math
import operator
import random
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from sit_core.engine.sampling import Sampling
from sit_core.errors import SitError

# The local table the lookup tool reads. Invented items, so the answer can only come from the tool.
INVENTORY = {
    "widget": {"price_usd": 4.5, "weight_kg": 0.2, "stock": 130},
    "gizmo": {"price_usd": 12.0, "weight_kg": 1.5, "stock": 42},
    "sprocket": {"price_usd": 0.75, "weight_kg": 0.05, "stock": 900},
    "flange": {"price_usd": 8.25, "weight_kg": 2.4, "stock": 65},
    "gasket": {"price_usd": 1.1, "weight_kg": 0.01, "stock": 2400},
    "bracket": {"price_usd": 3.6, "weight_kg": 0.8, "stock": 310},
}

# Units of one dimension, as a factor to that dimension's base unit.
_UNITS = {
    "length": {"m": 1.0, "km": 1000.0, "mi": 1609.344, "ft": 0.3048, "cm": 0.01},
    "mass": {"kg": 1.0, "g": 0.001, "lb": 0.45359237, "oz": 0.028349523125},
    "volume": {"l": 1.0, "ml": 0.001, "gal": 3.785411784},
}
_TEMPERATURE = ("c", "f")
UNIT_NAMES = [u for dim in _UNITS.values() for u in dim] + list(_TEMPERATURE)

SYSTEM_PROMPT = (
    "You solve tasks by calling tools. To call a tool, reply with only one JSON object, for example:\n"
    '{"tool": "calculator", "args": {"expression": "3 * (4 + 5)"}}\n'
    "Tools:\n"
    '- calculator: args {"expression": "<arithmetic with + - * / ** and parentheses>"}\n'
    '- convert: args {"value": <number>, "from": "<unit>", "to": "<unit>"}; units: ' + ", ".join(UNIT_NAMES) + "\n"
    '- lookup: args {"item": "<item>", "field": "<field>"}; items: ' + ", ".join(INVENTORY)
    + "; fields: price_usd, weight_kg, stock\n"
    "After each call you get the result. When you know the answer, reply with only:\n"
    '{"answer": <number>}'
)


class ToolError(ValueError):
    """A call the model made that cannot run (unknown tool, bad arguments)."""


_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.Pow: operator.pow, ast.Mod: operator.mod, ast.FloorDiv: operator.floordiv}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos}


def calculator(expression: str) -> float:
    """Arithmetic only: the expression is parsed, never passed to eval()."""

    def value(node: ast.AST) -> float:
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
            return float(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            right = value(node.right)
            if isinstance(node.op, ast.Pow) and abs(right) > 64:
                raise ToolError("exponent too large")
            return _BINOPS[type(node.op)](value(node.left), right)
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return _UNARY[type(node.op)](value(node.operand))
        raise ToolError(f"unsupported expression element: {ast.dump(node)[:40]}")

    try:
        return value(ast.parse(str(expression), mode="eval").body)
    except (SyntaxError, ZeroDivisionError, OverflowError) as e:
        raise ToolError(f"cannot evaluate {expression!r}: {e}") from None


def convert(value: float, from_unit: str, to_unit: str) -> float:
    src, dst = str(from_unit).lower().strip(), str(to_unit).lower().strip()
    x = float(value)
    if src in _TEMPERATURE and dst in _TEMPERATURE:
        celsius = x if src == "c" else (x - 32) * 5 / 9
        return celsius if dst == "c" else celsius * 9 / 5 + 32
    for units in _UNITS.values():
        if src in units and dst in units:
            return x * units[src] / units[dst]
    raise ToolError(f"cannot convert {src!r} to {dst!r}; units: {', '.join(UNIT_NAMES)}")


def lookup(item: str, field: str) -> float:
    row = INVENTORY.get(str(item).lower().strip())
    if row is None:
        raise ToolError(f"no item {item!r}; items: {', '.join(INVENTORY)}")
    if field not in row:
        raise ToolError(f"no field {field!r}; fields: {', '.join(row)}")
    return float(row[field])


def run_tool(call: dict) -> float:
    name, args = call.get("tool"), call.get("args")
    if not isinstance(args, dict):
        raise ToolError('"args" must be an object')
    try:
        if name == "calculator":
            return calculator(args["expression"])
        if name == "convert":
            return convert(args["value"], args["from"], args["to"])
        if name == "lookup":
            return lookup(args["item"], args["field"])
    except KeyError as e:
        raise ToolError(f"missing argument {e} for tool {name!r}") from None
    except (TypeError, ValueError) as e:
        raise ToolError(f"bad arguments for tool {name!r}: {e}") from None
    raise ToolError(f"unknown tool {name!r}; tools: calculator, convert, lookup")


# ---------------------------------------------------------------------------------------
# Tasks


@dataclass(frozen=True)
class AgentTask:
    index: int
    kind: str
    question: str
    answer: float
    min_calls: int  # tool calls a correct solution needs


def _task(index: int, rng: random.Random) -> AgentTask:
    kind = ("arithmetic", "conversion", "lookup", "lookup_then_calculate", "lookup_then_convert")[index % 5]
    item = rng.choice(sorted(INVENTORY))
    if kind == "arithmetic":
        a, b, c = rng.randint(12, 99), rng.randint(12, 99), rng.randint(100, 999)
        return AgentTask(index, kind, f"What is {a} * {b} + {c}?", a * b + c, 1)
    if kind == "conversion":
        src, dst = rng.choice([("mi", "km"), ("kg", "lb"), ("gal", "l"), ("ft", "m"), ("f", "c")])
        x = rng.randint(3, 250)
        return AgentTask(index, kind, f"Convert {x} {src} to {dst}.", convert(x, src, dst), 1)
    if kind == "lookup":
        field = rng.choice(["price_usd", "stock"])
        what = "the price in USD of one" if field == "price_usd" else "the number in stock of"
        return AgentTask(index, kind, f"What is {what} {item} in the inventory?", INVENTORY[item][field], 1)
    if kind == "lookup_then_calculate":
        n = rng.randint(3, 40)
        return AgentTask(index, kind, f"What do {n} units of {item} cost in USD in total?",
                         n * INVENTORY[item]["price_usd"], 2)
    return AgentTask(index, kind, f"How many pounds (lb) does one {item} weigh?",
                     convert(INVENTORY[item]["weight_kg"], "kg", "lb"), 2)


def build_tasks(num_tasks: int, seed: int) -> list[AgentTask]:
    return [_task(i, random.Random(f"{seed}-agent-{i}")) for i in range(num_tasks)]


def parse_reply(text: str) -> dict | None:
    """The first JSON object in the reply that is a tool call or a final answer, else None."""
    return _first_call(text)[0]


def _first_call(text: str) -> tuple[dict | None, int]:
    """(the first tool call or final answer in `text`, where it ends), or (None, len(text))."""
    decoder = json.JSONDecoder()
    start = text.find("{")
    while start != -1:
        try:
            obj, end = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            obj = None
        if isinstance(obj, dict) and ("tool" in obj or "answer" in obj):
            return obj, end
        start = text.find("{", start + 1)
    return None, len(text)


def _as_number(value: Any) -> float | None:
    try:
        number = float(str(value).replace(",", "").strip())
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def is_correct(answer: Any, expected: float) -> bool:
    number = _as_number(answer)
    return number is not None and math.isclose(number, expected, rel_tol=0.01, abs_tol=0.01)


class Conversation:
    """One task's dialogue with the model: the model replies, a tool call is run and its result
    fed back, until a final answer or `max_steps` replies."""

    def __init__(self, task: AgentTask, max_steps: int):
        self.task, self.max_steps = task, max_steps
        self.messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": task.question}]
        self.turns: list[dict] = []
        self.answer: Any = None
        self.done = False

    def advance(self, text: str) -> None:
        self.messages.append({"role": "assistant", "content": text})
        parsed = parse_reply(text)
        turn: dict[str, Any] = {"reply": text, "valid": False}
        self.turns.append(turn)
        if parsed is not None and "answer" in parsed:
            turn.update(valid=_as_number(parsed["answer"]) is not None, answer=parsed["answer"])
            self.answer, self.done = parsed["answer"], True
            return
        if parsed is None:
            feedback = 'Invalid reply. Reply with only a JSON tool call or {"answer": <number>}.'
        else:
            try:
                result = run_tool(parsed)
                turn.update(valid=True, tool=parsed.get("tool"), result=result)
                feedback = f"Result: {result:g}"
            except ToolError as e:
                turn.update(tool=parsed.get("tool"), error=str(e))
                feedback = f"Error: {e}"
        self.messages.append({"role": "user", "content": feedback})
        self.done = len(self.turns) >= self.max_steps

    def result(self) -> dict:
        task, turns = self.task, self.turns
        return {"index": task.index, "kind": task.kind, "question": task.question, "expected": task.answer,
                "answer": self.answer, "success": self.answer is not None and is_correct(self.answer, task.answer),
                "steps": len(turns), "valid_turns": sum(t["valid"] for t in turns),
                "tool_calls": sum(1 for t in turns if "tool" in t), "turns": turns}


def solve_all(tasks: list[AgentTask], reply: Callable[[list[int], list[list[dict]]], list[str]],
              max_steps: int) -> list[dict]:
    """Every task's transcript and outcome. `reply` answers the open conversations together, one
    engine call per step: it gets their positions in `tasks` and their messages."""
    conversations = [Conversation(task, max_steps) for task in tasks]
    while open_ := [i for i, c in enumerate(conversations) if not c.done]:
        for i, text in zip(open_, reply(open_, [conversations[i].messages for i in open_])):
            conversations[i].advance(text)
    return [c.result() for c in conversations]


def solve(task: AgentTask, reply: Callable[[list[dict]], str], max_steps: int) -> dict:
    """One task against `reply` (messages -> assistant text)."""
    return solve_all([task], lambda _, batch: [reply(messages) for messages in batch], max_steps)[0]


def summarize(results: list[dict]) -> dict:
    n = len(results)
    turns = sum(r["steps"] for r in results)
    return {
        "num_tasks": n,
        "success_rate": sum(r["success"] for r in results) / n if n else 0.0,
        "valid_call_rate": sum(r["valid_turns"] for r in results) / turns if turns else 0.0,
        "mean_steps": turns / n if n else 0.0,
        "answer_rate": sum(r["answer"] is not None for r in results) / n if n else 0.0,
        "by_kind": {kind: sum(r["success"] for r in results if r["kind"] == kind)
                    / max(1, sum(1 for r in results if r["kind"] == kind))
                    for kind in sorted({r["kind"] for r in results})},
    }


# ---------------------------------------------------------------------------------------
# Driving a generation engine (sit_core/engine/engines.py)

# Greedy, and short: a tool call or an answer is one small JSON object.
REPLY = Sampling(temperature=0.0, top_p=1.0, max_new_tokens=64)


def render(tokenizer, messages: list[dict]) -> list[int]:
    """The conversation as prompt ids, through the model's chat template; a base model without
    one gets a plain transcript."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    lines = [m["content"] if m["role"] == "system" else f"{m['role'].capitalize()}: {m['content']}" for m in messages]
    return tokenizer("\n\n".join(lines) + "\n\nAssistant:")["input_ids"]


def engine_replier(engine, adapters: list[str | None],
                   tokenizers: list) -> Callable[[list[int], list[list[dict]]], list[str]]:
    """Greedy replies from an engine, conversation i with adapter directory `adapters[i]` (None:
    the base model), rendered and read with `tokenizers[i]`. A reply is cut where its first tool
    call or answer ends: what follows is never read, and must not be fed back into the next
    turn's prompt."""

    def reply(rows: list[int], conversations: list[list[dict]]) -> list[str]:
        prompts = [render(tokenizers[i], messages) for i, messages in zip(rows, conversations)]
        completions = engine.generate(prompts, [0] * len(prompts), REPLY, [adapters[i] for i in rows])
        texts = [tokenizers[i].decode(c.ids, skip_special_tokens=True) for i, c in zip(rows, completions)]
        return [text[:_first_call(text)[1]].strip() for text in texts]

    return reply


def prompt_budget(model: str, num_tasks: int, max_steps: int, seed: int, trust_remote_code: bool) -> int:
    """The longest conversation the tasks can reach, in tokens: an engine's max_model_len.
    Every step adds a reply and a short tool result."""
    from sit_core.engine.models import load_tokenizer

    tokenizer = load_tokenizer(model, trust_remote_code=trust_remote_code)
    first = max(len(render(tokenizer, Conversation(t, max_steps).messages)) for t in build_tasks(num_tasks, seed))
    return first + max_steps * (REPLY.max_new_tokens + 48)


def evaluate_agents(engine, adapters: dict[str, str | None], *, num_tasks: int, max_steps: int, seed: int,
                    tokenizers: dict | None = None) -> dict[str, dict]:
    """Each variant's agent evaluation: its summary and transcripts. `adapters` maps a variant
    to its adapter directory (None: the base model); `tokenizers`, to the tokenizer whose chat
    template it was trained with (default: the engine's). The variants' conversations advance
    together, one engine call per step for all of them, so their rows share decoding steps."""
    tasks = build_tasks(num_tasks, seed)
    variants = [v for v in adapters for _ in tasks]
    tokenizer = {v: (tokenizers or {}).get(v, engine.tokenizer) for v in adapters}
    results = solve_all(tasks * len(adapters), engine_replier(engine, [adapters[v] for v in variants],
                                                              [tokenizer[v] for v in variants]), max_steps)
    out = {}
    for n, variant in enumerate(adapters):
        mine = results[n * len(tasks):(n + 1) * len(tasks)]
        out[variant] = {"summary": {**summarize(mine), "backend": engine.backend}, "tasks": mine}
    return out


# ---------------------------------------------------------------------------------------
# AgentBench (optional, needs a checkout and its own setup)

# The command the stage runs, in the checkout. AgentBench's README: start the task workers
# first (`python -m src.start_task -a`) and describe the agent under test in
# configs/agents/ (an OpenAI-compatible endpoint serving the model); then the assigner runs
# every assignment in the config and writes outputs/<time>/<agent>/<task>/overall.json.
AGENTBENCH_COMMAND = [sys.executable, "-m", "src.assigner", "--config", "configs/assignments/default.yaml"]


def run_agentbench(checkout: str | Path, timeout_s: float | None = None) -> list[dict]:
    """Run AgentBench's assigner in `checkout` and parse the overall.json files it wrote."""
    root = Path(checkout).expanduser()
    if not (root / "src" / "assigner.py").exists():
        raise SitError(f"evaluation.agent.agentbench_path={root} is not an AgentBench checkout (no src/assigner.py)",
                       "clone THUDM/AgentBench there and follow its setup, or unset evaluation.agent.agentbench_path")
    started = time.time()
    proc = subprocess.run(AGENTBENCH_COMMAND, cwd=root, capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        raise SitError(f"AgentBench exited with code {proc.returncode}: {proc.stderr.strip()[-800:]}",
                       "check that its task workers run (python -m src.start_task -a) and that "
                       "configs/agents/ points at the served model")
    return parse_agentbench_outputs(root / "outputs", newer_than=started)


def parse_agentbench_outputs(outputs_dir: str | Path, newer_than: float = 0.0) -> list[dict]:
    """One row per <agent>/<task>/overall.json under outputs_dir (AgentBench's layout:
    outputs/<time>/<agent>/<task>/overall.json), with its numeric values flattened."""
    rows = []
    for path in sorted(Path(outputs_dir).glob("*/*/*/overall.json")):
        if path.stat().st_mtime < newer_than:
            continue
        data = json.loads(path.read_text(encoding="utf-8"))
        rows.append({"run": path.parts[-4], "agent": path.parts[-3], "task": path.parts[-2],
                     "metrics": _flatten_numbers(data)})
    return rows


def _flatten_numbers(obj: Any, prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(_flatten_numbers(v, f"{prefix}{k}."))
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        out[prefix.rstrip(".")] = float(obj)
    return out
