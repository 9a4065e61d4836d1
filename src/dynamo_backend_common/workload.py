"""A deterministic shared-prefix, multi-turn workload: what makes KV-aware routing pay off.

Conversations each start from one of ``num_system_prompts`` system prompts (conversation ``c``
uses prompt ``c % num_system_prompts``). Turn ``t`` of a conversation sends its whole history::

    system prompt | user_0 | output_0 | user_1 | output_1 | ... | user_t

where ``output_i`` are stand-in tokens for the model's reply (the real reply is unknown when the
workload is generated; a server whose output differs simply caches a different suffix). So all
turns of all conversations sharing a system prompt share its blocks, and turn ``t+1`` of a
conversation extends turn ``t``'s prompt.

Every token run is drawn from its own seeded stream (``seed``, kind, indices), so the workload is
reproducible across processes and Python runs, and a workload with more turns or conversations
extends a smaller one instead of reshuffling it.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Literal

__all__ = ["SharedPrefixWorkload", "WordVocab", "WorkloadRequest"]

Role = Literal["system", "user", "assistant"]


@dataclass(frozen=True, slots=True)
class WorkloadRequest:
    """One request of a workload.

    ``token_ids`` is the full prompt and equals the concatenation of ``parts`` (role-tagged
    segments, for building chat messages). ``index`` is the arrival order (0-based).
    """

    index: int
    conversation: int
    turn: int
    system_prompt: int
    token_ids: list[int]
    max_tokens: int
    parts: tuple[tuple[Role, tuple[int, ...]], ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class SharedPrefixWorkload:
    """Parameters of the workload; :meth:`requests` generates it (same parameters, same list).

    ``order="interleaved"`` sends turn 0 of every conversation (in a seeded shuffled order),
    then turn 1 of every conversation, and so on, as concurrent chat sessions would;
    ``"sequential"`` sends each conversation's turns back to back. Either way a turn arrives
    after the previous turn of its conversation. Token ids are drawn from ``[0, vocab_size)``.
    """

    num_system_prompts: int = 4
    system_prompt_tokens: int = 1024
    num_conversations: int = 32
    turns: int = 3
    user_tokens: int = 128
    output_tokens: int = 64
    vocab_size: int = 32000
    seed: int = 0
    order: Literal["interleaved", "sequential"] = "interleaved"

    def __post_init__(self) -> None:
        for name in ("num_system_prompts", "num_conversations", "turns", "vocab_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        for name in ("system_prompt_tokens", "user_tokens", "output_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.order not in ("interleaved", "sequential"):
            raise ValueError(f"unknown order {self.order!r}")

    def __len__(self) -> int:
        return self.num_conversations * self.turns

    def _tokens(self, kind: str, *index: int, n: int) -> tuple[int, ...]:
        # A str seed is hashed with SHA-512 by random.seed, hence stable across runs.
        rng = random.Random(f"{self.seed}:{kind}:{':'.join(map(str, index))}")
        return tuple(rng.choices(range(self.vocab_size), k=n))

    def system_prompt(self, i: int) -> tuple[int, ...]:
        """Tokens of system prompt ``i``."""
        return self._tokens("system", i, n=self.system_prompt_tokens)

    def _arrivals(self) -> Iterator[tuple[int, int]]:
        if self.order == "sequential":
            for c in range(self.num_conversations):
                for t in range(self.turns):
                    yield c, t
            return
        for t in range(self.turns):
            convs = list(range(self.num_conversations))
            random.Random(f"{self.seed}:order:{t}").shuffle(convs)
            for c in convs:
                yield c, t

    def requests(self) -> list[WorkloadRequest]:
        """All ``num_conversations * turns`` requests, in arrival order."""
        systems = [self.system_prompt(i) for i in range(self.num_system_prompts)]
        out: list[WorkloadRequest] = []
        for index, (c, t) in enumerate(self._arrivals()):
            s = c % self.num_system_prompts
            parts: list[tuple[Role, tuple[int, ...]]] = [("system", systems[s])]
            for prev in range(t):
                parts.append(("user", self._tokens("user", c, prev, n=self.user_tokens)))
                parts.append(("assistant", self._tokens("out", c, prev, n=self.output_tokens)))
            parts.append(("user", self._tokens("user", c, t, n=self.user_tokens)))
            tokens = [tok for _, seg in parts for tok in seg]
            out.append(
                WorkloadRequest(
                    index=index,
                    conversation=c,
                    turn=t,
                    system_prompt=s,
                    token_ids=tokens,
                    max_tokens=self.output_tokens,
                    parts=tuple(parts),
                )
            )
        return out


class WordVocab:
    """Maps token ids to distinct pronounceable words, to drive a text (HTTP) frontend.

    Word ``i`` spells ``i`` in base 100 with one consonant-vowel syllable per digit, so distinct
    ids give distinct words and equal token prefixes give equal text prefixes. The frontend's
    tokenizer will not map the words back to the same ids, but shared prefixes stay shared.
    """

    _CONSONANTS = "bdfghjklmnprstvwxyzq"
    _VOWELS = "aeiou"

    def __init__(self) -> None:
        self._syllables = [c + v for c in self._CONSONANTS for v in self._VOWELS]
        self._cache: dict[int, str] = {}

    def word(self, token_id: int) -> str:
        """The word for ``token_id`` (>= 0)."""
        w = self._cache.get(token_id)
        if w is None:
            if token_id < 0:
                raise ValueError("token ids are >= 0")
            digits: list[str] = []
            n = token_id
            while True:
                n, d = divmod(n, 100)
                digits.append(self._syllables[d])
                if n == 0:
                    break
            w = self._cache[token_id] = "".join(reversed(digits))
        return w

    def text(self, token_ids: Iterable[int]) -> str:
        """Space-separated words of ``token_ids``."""
        return " ".join(self.word(t) for t in token_ids)

    def messages(self, request: WorkloadRequest) -> list[dict[str, str]]:
        """``request`` as OpenAI chat messages (one per part, roles kept)."""
        return [{"role": role, "content": self.text(seg)} for role, seg in request.parts]
