"""SharedPrefixWorkload: determinism, multi-turn structure and shared prefix blocks."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dynamo_backend_common.kv.hashing import block_hashes
from dynamo_backend_common.workload import SharedPrefixWorkload, WordVocab, WorkloadRequest

SMALL = SharedPrefixWorkload(
    num_system_prompts=3,
    system_prompt_tokens=64,
    num_conversations=7,
    turns=3,
    user_tokens=20,
    output_tokens=12,
    vocab_size=500,
    seed=11,
)


def by_conv(reqs: list[WorkloadRequest]) -> dict[tuple[int, int], WorkloadRequest]:
    return {(r.conversation, r.turn): r for r in reqs}


def test_deterministic_and_seed_dependent() -> None:
    a = SMALL.requests()
    b = SharedPrefixWorkload(**{f: getattr(SMALL, f) for f in SMALL.__dataclass_fields__})
    assert b.requests() == a
    c = SharedPrefixWorkload(
        **{**{f: getattr(SMALL, f) for f in SMALL.__dataclass_fields__}, "seed": 12}
    )
    assert [r.token_ids for r in c.requests()] != [r.token_ids for r in a]


def test_multi_turn_structure() -> None:
    reqs = SMALL.requests()
    assert len(reqs) == len(SMALL) == 21
    assert [r.index for r in reqs] == list(range(21))
    convs = by_conv(reqs)
    for r in reqs:
        assert r.system_prompt == r.conversation % 3
        assert r.max_tokens == 12
        assert all(0 <= t < 500 for t in r.token_ids)
        assert r.token_ids == [t for _, seg in r.parts for t in seg]
        assert r.token_ids[:64] == list(SMALL.system_prompt(r.system_prompt))
        assert len(r.token_ids) == 64 + r.turn * (20 + 12) + 20
        assert [role for role, _ in r.parts] == ["system"] + ["user", "assistant"] * r.turn + [
            "user"
        ]
        if r.turn:
            prev = convs[(r.conversation, r.turn - 1)]
            assert prev.index < r.index  # history arrives first
            # this turn = previous prompt + stand-in output + new user message
            assert r.token_ids[: len(prev.token_ids)] == prev.token_ids
            assert r.parts[: len(prev.parts)] == prev.parts
    # interleaved: all first turns before any second turn
    assert [r.turn for r in reqs] == sorted(r.turn for r in reqs)
    assert [r.conversation for r in reqs[:7]] != list(range(7))  # shuffled within a round


def test_sequential_order() -> None:
    seq = SharedPrefixWorkload(
        num_conversations=3,
        turns=2,
        system_prompt_tokens=8,
        user_tokens=4,
        output_tokens=4,
        order="sequential",
    )
    reqs = seq.requests()
    assert [(r.conversation, r.turn) for r in reqs] == [
        (0, 0),
        (0, 1),
        (1, 0),
        (1, 1),
        (2, 0),
        (2, 1),
    ]


def test_prompts_share_system_prompt_blocks() -> None:
    bs = 16
    reqs = SMALL.requests()
    hashes = {r.index: block_hashes(r.token_ids, bs) for r in reqs}
    sys_blocks = 64 // bs
    for r in reqs:
        for o in reqs:
            shared = 0
            for x, y in zip(hashes[r.index], hashes[o.index], strict=False):
                if x != y:
                    break
                shared += 1
            if r.system_prompt == o.system_prompt:
                assert shared >= sys_blocks
            else:
                assert shared == 0
            if r.conversation != o.conversation:
                # different conversations diverge right after the system prompt
                assert shared <= sys_blocks + 1


def test_more_turns_extend_a_smaller_workload() -> None:
    fields = {f: getattr(SMALL, f) for f in SMALL.__dataclass_fields__}
    bigger = SharedPrefixWorkload(**{**fields, "turns": 5, "num_conversations": 9})
    small, big = by_conv(SMALL.requests()), by_conv(bigger.requests())
    for key, r in small.items():
        assert big[key].token_ids == r.token_ids


@settings(max_examples=30, deadline=None)
@given(
    st.integers(1, 4),
    st.integers(0, 40),
    st.integers(1, 6),
    st.integers(1, 4),
    st.integers(0, 9),
    st.integers(0, 9),
)
def test_sizes(s: int, sys_tokens: int, convs: int, turns: int, user: int, out: int) -> None:
    w = SharedPrefixWorkload(
        num_system_prompts=s,
        system_prompt_tokens=sys_tokens,
        num_conversations=convs,
        turns=turns,
        user_tokens=user,
        output_tokens=out,
        vocab_size=50,
    )
    reqs = w.requests()
    assert len(reqs) == convs * turns
    assert sorted((r.conversation, r.turn) for r in reqs) == [
        (c, t) for c in range(convs) for t in range(turns)
    ]
    assert sum(len(r.token_ids) for r in reqs) == sum(
        sys_tokens + t * (user + out) + user for c in range(convs) for t in range(turns)
    )


def test_validation() -> None:
    with pytest.raises(ValueError):
        SharedPrefixWorkload(turns=0)
    with pytest.raises(ValueError):
        SharedPrefixWorkload(user_tokens=-1)
    with pytest.raises(ValueError):
        SharedPrefixWorkload(order="random")  # type: ignore[arg-type]


def test_word_vocab() -> None:
    v = WordVocab()
    words = [v.word(i) for i in range(20_000)]
    assert len(set(words)) == 20_000
    assert all(" " not in w and w.isalpha() for w in words)
    assert v.text([1, 2, 3]).split() == [v.word(1), v.word(2), v.word(3)]
    r = SMALL.requests()[-1]
    msgs = v.messages(r)
    assert [m["role"] for m in msgs] == [role for role, _ in r.parts]
    assert msgs[0]["content"] == v.text(SMALL.system_prompt(r.system_prompt))
    with pytest.raises(ValueError):
        v.word(-1)
