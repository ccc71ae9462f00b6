"""Reward scoring for preference pairs: a sequence-classification reward model or an LLM judge.

Both scorers take (instruction, response) pairs and return one float per pair, higher is
better. Scores are only compared within one instruction, so the two scales need not agree.

- `ClassifierScorer`: a reward model with a one-logit head, such as
  OpenAssistant/reward-model-deberta-v3-large-v2. It was trained on `tokenizer(question,
  answer)` text pairs, so it is fed exactly that; the score is the logit.
- `JudgeScorer`: any chat model asked `preference.judge_question` about the pair; the score is
  P("Yes") / (P("Yes") + P("No")) from the next-token logits. A small judge (the demo's
  SmolLM2-135M) is a weak signal and is meant for demonstration only.

Inputs longer than `preference.reward_max_length` tokens are truncated, never rejected.
"""

from __future__ import annotations

from typing import Sequence

import torch

from sit_core.config import SitConfig
from sit_core.errors import SitError
from sit_core.engine.models import LOADING, load_causal_lm, pick_device, release, resolve_model_path
from sit_core.engine.sampling import chat_prompt

Pair = tuple[str, str]  # (instruction, response)


class ClassifierScorer:
    def __init__(self, ref: str, max_length: int, trust_remote_code: bool = False):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        path = resolve_model_path(ref)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
            with LOADING:
                self.model = AutoModelForSequenceClassification.from_pretrained(
                    path, dtype=torch.float32, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as e:
            raise SitError(f"could not load the reward model '{ref}': {e}",
                           "point models.reward_model at a sequence-classification reward model (hub id or local "
                           "directory), or set models.reward_type to llm_judge for a chat model") from None
        if self.model.config.num_labels != 1:
            raise SitError(f"reward model '{ref}' has {self.model.config.num_labels} output labels, not one score",
                           "use a reward model with a single-logit head (num_labels=1), or models.reward_type=llm_judge")
        self.device = pick_device()
        self.model.to(self.device).eval()
        # model_max_length is a huge sentinel when the tokenizer does not know its limit.
        limit = self.tokenizer.model_max_length if self.tokenizer.model_max_length < 1_000_000 else max_length
        self.max_length = min(max_length, limit)
        self._pair_specials = self.tokenizer.num_special_tokens_to_add(pair=True)

    def _encode(self, instruction: str, response: str) -> dict:
        # The reward model should see the answer: truncate only the answer ("only_second"),
        # unless the question alone fills the window, where only_second would raise and
        # longest_first trims both.
        q_len = len(self.tokenizer(instruction, add_special_tokens=False)["input_ids"])
        fits = q_len + self._pair_specials < self.max_length
        return self.tokenizer(instruction, response, truncation="only_second" if fits else "longest_first",
                              max_length=self.max_length)

    @torch.inference_mode()
    def score(self, pairs: Sequence[Pair]) -> list[float]:
        # Rows are encoded one by one so a row's truncation never depends on its batch mates.
        batch = self.tokenizer.pad([self._encode(q, a) for q, a in pairs], return_tensors="pt")
        logits = self.model(**{k: v.to(self.device) for k, v in batch.items()}).logits
        return [float(x) for x in logits[:, 0].float().cpu()]

    def close(self) -> None:
        self.model = None  # drop our reference first so release() can actually free it
        release()


class JudgeScorer:
    YES = ("Yes", " Yes", "yes", " yes", "YES")
    NO = ("No", " No", "no", " no", "NO")

    def __init__(self, ref: str, question: str, max_length: int, trust_remote_code: bool = False):
        try:
            self.lm = load_causal_lm(ref, trust_remote_code=trust_remote_code)
        except SitError as e:
            raise SitError(f"could not load the judge model: {e.problem}", e.fix) from None
        tok = self.lm.tokenizer
        self.question = question
        self.max_length = max_length
        # First token of each spelling; the two sets must not share a token or the score is meaningless.
        self.yes_ids = sorted({tok(w, add_special_tokens=False)["input_ids"][0] for w in self.YES})
        self.no_ids = sorted({tok(w, add_special_tokens=False)["input_ids"][0] for w in self.NO})
        if set(self.yes_ids) & set(self.no_ids):
            raise SitError(f"the tokenizer of judge '{ref}' does not tell 'Yes' from 'No' by the first token",
                           "use another chat model as models.reward_model")

    def _truncate(self, text: str, budget: int) -> str:
        tok = self.lm.tokenizer
        ids = tok(text, add_special_tokens=False)["input_ids"]
        return text if len(ids) <= budget else tok.decode(ids[:budget])

    def _prompt(self, instruction: str, response: str) -> list[int]:
        # The instruction gets at most half of the budget; the response gets the rest.
        instruction = self._truncate(instruction, self.max_length // 2)
        used = len(self.lm.tokenizer(instruction, add_special_tokens=False)["input_ids"])
        response = self._truncate(response, max(self.max_length - used, 1))
        content = (f"{self.question}\n\nRequest:\n{instruction}\n\nResponse:\n{response}\n\n"
                   "Answer with Yes or No.")
        return chat_prompt(self.lm.tokenizer, None, content)

    @torch.inference_mode()
    def score(self, pairs: Sequence[Pair]) -> list[float]:
        prompts = [self._prompt(q, a) for q, a in pairs]
        pad = self.lm.tokenizer.pad_token_id
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):  # left padding: the last column is every row's next-token slot
            ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        device = next(self.lm.model.parameters()).device
        # logits_to_keep=1: the vocabulary projection of every other position was a fifth of
        # SmolLM2's FLOPs per token, and for 8 rows of 300 tokens 470 MB of logits.
        logits = self.lm.model(input_ids=ids.to(device), attention_mask=mask.to(device),
                               position_ids=positions.to(device), logits_to_keep=1).logits[:, -1, :].float()
        logp = torch.log_softmax(logits, dim=-1)
        yes = torch.logsumexp(logp[:, self.yes_ids], dim=-1)
        no = torch.logsumexp(logp[:, self.no_ids], dim=-1)
        return [float(x) for x in torch.sigmoid(yes - no).cpu()]  # P(yes | the answer is yes or no)

    def close(self) -> None:
        self.lm = None
        release()


def load_scorer(cfg: SitConfig) -> ClassifierScorer | JudgeScorer:
    p = cfg.preference
    if cfg.models.reward_type == "classifier":
        return ClassifierScorer(cfg.models.reward_model, p.reward_max_length, cfg.models.trust_remote_code)
    return JudgeScorer(cfg.models.reward_model, p.judge_question, p.reward_max_length, cfg.models.trust_remote_code)
