"""Structured output for the mocker: schema-valid JSON instances, and the sequence that emits one.

The mocker does not sample from a model, so it cannot mask logits; it honours a guided-decoding
request by *writing* a valid answer up front and emitting its tokens:

- :func:`instance_for_schema` builds a JSON value that satisfies a JSON schema, drawn from a
  ``random.Random`` (same seed, same schema: same value);
- :func:`guided_text` turns a request's ``GuidedDecodingOptions`` into the output text (compact
  JSON for ``json``, one of the strings for ``choice``) and rejects what the mocker cannot honour;
- :class:`ScriptedSequence` is a scheduler :class:`~.scheduler.Sequence` whose "sampled" tokens
  are that text's tokenizer encoding, so it runs through the normal scheduler path (same KV
  blocks, same simulated step times) and only its token choice differs.

Every rejection is ``DynamoError(InvalidArgument)`` naming the keyword and where it is.
"""

from __future__ import annotations

import json
import math
import random
import string
from collections.abc import Mapping
from typing import Any, Final

from ...errors import DynamoError
from ...protocols.common import FinishReason, GuidedDecodingOptions
from .scheduler import Sequence, StopRules

__all__ = [
    "SUPPORTED_KEYWORDS",
    "ScriptedSequence",
    "guided_text",
    "instance_for_schema",
]

#: Keywords :func:`instance_for_schema` honours.
SUPPORTED_KEYWORDS: Final = frozenset({
    "type", "enum", "const",
    "properties", "required", "additionalProperties",
    "items", "minItems", "maxItems",
    "anyOf", "oneOf", "allOf", "$ref",
    "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum",
    "minLength", "maxLength",
})
# Annotations and containers: they constrain nothing an instance must satisfy (``format`` is a
# hint to validators that most do not enforce; ``discriminator`` only names the oneOf branch).
_IGNORED: Final = frozenset({
    "$schema", "$id", "$comment", "$defs", "definitions", "$anchor",
    "title", "description", "default", "examples", "deprecated", "readOnly", "writeOnly",
    "format", "contentEncoding", "contentMediaType", "discriminator", "nullable", "strict",
})
_TYPES: Final = ("object", "array", "string", "number", "integer", "boolean", "null")
# Past this depth optional properties are left out and arrays take their minimum, so recursive
# schemas (trees, linked lists) end; past _MAX_DEPTH the schema is refused.
_SHALLOW: Final = 6
_MAX_DEPTH: Final = 48
# Without an upper bound, strings get up to this many characters beyond their minimum, arrays
# this many items beyond theirs, open objects up to this many made-up properties.
_STRING_SPAN: Final = 10
_ARRAY_SPAN: Final = 3
_OPEN_PROPERTIES: Final = 3
_NUMBER_SPAN: Final = 100
_ALPHABET: Final = string.ascii_lowercase


def _invalid(message: str, path: str) -> DynamoError:
    return DynamoError.invalid_argument(f"guided decoding: {message} (at {path})")


def instance_for_schema(schema: Any, rng: random.Random) -> Any:
    """A JSON value (dicts, lists, str, int, float, bool, None) that satisfies ``schema``.

    Covers ``type`` (a list: the first entry), ``enum``, ``const``, ``properties`` /
    ``required`` / ``additionalProperties`` (required properties always, optional ones by coin
    flip, made-up ones only for an object that declares none and allows them), ``items`` /
    ``minItems`` / ``maxItems``, ``anyOf`` / ``oneOf`` (the first branch), ``allOf`` of one
    schema, local ``$ref`` (``#``, ``#/$defs/...``, ``#/definitions/...``, any JSON pointer),
    ``minimum`` / ``maximum`` / ``exclusiveMinimum`` / ``exclusiveMaximum`` (numeric forms),
    ``minLength`` / ``maxLength``. Annotations (``title``, ``description``, ``default``,
    ``format``, ...) and ``x-`` extensions are ignored. Any other keyword anywhere in the schema
    (checked up front, so whether a schema is refused does not depend on ``rng``), a malformed
    value or an unsatisfiable schema raises ``DynamoError(InvalidArgument)``; an optional
    property that cannot be satisfied is left out. Deterministic: the value depends only on
    ``schema`` and the state of ``rng``.
    """
    _check_tree(schema, "#")
    return _Generator(schema, rng).value(schema, "#", 0)


def _check_tree(schema: Any, path: str) -> None:
    """Refuse unknown keywords in ``schema`` and every subschema it holds."""
    if isinstance(schema, bool):
        return
    node = _checked(schema, path)
    for key in ("properties", "$defs", "definitions"):
        subs = node.get(key)
        if isinstance(subs, Mapping):
            for name, sub in subs.items():
                _check_tree(sub, f"{path}/{key}/{name}")
    for key in ("items", "additionalProperties"):
        if isinstance(node.get(key), Mapping):
            _check_tree(node[key], f"{path}/{key}")
    for key in ("anyOf", "oneOf", "allOf"):
        subs = node.get(key)
        if isinstance(subs, list):
            for i, sub in enumerate(subs):
                _check_tree(sub, f"{path}/{key}/{i}")


class _Generator:
    def __init__(self, root: Any, rng: random.Random) -> None:
        self.root = root
        self.rng = rng

    # -- dispatch ---------------------------------------------------------------------------
    def value(self, schema: Any, path: str, depth: int) -> Any:
        if depth > _MAX_DEPTH:
            raise _invalid("schema nests (or recurses) too deeply", path)
        schema = self._resolve(_checked(schema, path), path)
        if "const" in schema:
            return schema["const"]
        if "enum" in schema:
            enum = schema["enum"]
            if not isinstance(enum, list) or not enum:
                raise _invalid("enum must be a non-empty array", path)
            return self.rng.choice(enum)
        kind = self._type(schema, path)
        if kind == "object":
            return self._object(schema, path, depth)
        if kind == "array":
            return self._array(schema, path, depth)
        if kind == "string":
            return self._string(schema, path)
        if kind == "integer":
            return self._integer(schema, path)
        if kind == "number":
            return self._number(schema, path)
        if kind == "boolean":
            return self.rng.random() < 0.5
        return None

    def _resolve(self, schema: Mapping[str, Any], path: str) -> Mapping[str, Any]:
        """Follow ``$ref`` / ``anyOf`` / ``oneOf`` / ``allOf`` down to a plain schema."""
        for _ in range(_MAX_DEPTH):
            if "$ref" in schema:
                ref = schema["$ref"]
                target = _checked(self._ref(ref, path), f"{path}/$ref")
                rest = {k: v for k, v in schema.items() if k != "$ref"}
                # Siblings of $ref apply too (2019-09 on); pydantic puts descriptions there.
                schema = {**target, **rest}
                path = f"{path}/$ref"
                continue
            for key in ("anyOf", "oneOf", "allOf"):
                if key not in schema:
                    continue
                branches = schema[key]
                if not isinstance(branches, list) or not branches:
                    raise _invalid(f"{key} must be a non-empty array", path)
                if key == "allOf" and len(branches) != 1:
                    raise _invalid("allOf of more than one schema is not supported", path)
                rest = {k: v for k, v in schema.items() if k != key}
                constraints = [k for k in rest if k in SUPPORTED_KEYWORDS]
                if constraints:
                    raise _invalid(
                        f"{key} next to {', '.join(sorted(constraints))} is not supported", path
                    )
                path = f"{path}/{key}/0"
                schema = {**rest, **_checked(branches[0], path)}
                break
            else:
                return schema
        raise _invalid("$ref / anyOf chain too long (a reference cycle?)", path)

    def _ref(self, ref: Any, path: str) -> Any:
        if not isinstance(ref, str) or not ref.startswith("#"):
            raise _invalid(f"only local $ref (#...) is supported, not {ref!r}", path)
        node: Any = self.root
        pointer = ref[1:]
        if pointer and not pointer.startswith("/"):
            raise _invalid(f"$ref {ref!r} is not a JSON pointer", path)
        for part in pointer.split("/")[1:]:
            part = part.replace("~1", "/").replace("~0", "~")
            if isinstance(node, Mapping) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                raise _invalid(f"$ref {ref!r} points nowhere", path)
        return node

    def _type(self, schema: Mapping[str, Any], path: str) -> str:
        kind = schema.get("type")
        if isinstance(kind, list):
            if not kind:
                raise _invalid("type must not be an empty array", path)
            kind = kind[0]
        if kind is None:  # inferred from the keywords present; {} (anything) gives null
            if {"properties", "required", "additionalProperties"} & schema.keys():
                return "object"
            if {"items", "minItems", "maxItems"} & schema.keys():
                return "array"
            if {"minLength", "maxLength"} & schema.keys():
                return "string"
            if {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"} & schema.keys():
                return "number"
            return "null"
        if kind not in _TYPES:
            raise _invalid(f"unknown type {kind!r}", path)
        return str(kind)

    # -- types ------------------------------------------------------------------------------
    def _object(self, schema: Mapping[str, Any], path: str, depth: int) -> dict[str, Any]:
        props = schema.get("properties", {})
        required = schema.get("required", [])
        extra = schema.get("additionalProperties", True)
        if not isinstance(props, Mapping):
            raise _invalid("properties must be an object", path)
        if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
            raise _invalid("required must be an array of strings", path)
        out: dict[str, Any] = {}
        shallow = depth >= _SHALLOW
        for name, sub in props.items():
            where = f"{path}/properties/{name}"
            if name in required:
                out[name] = self.value(sub, where, depth + 1)
            elif not shallow and sub is not False and self.rng.random() < 0.5:
                try:
                    out[name] = self.value(sub, where, depth + 1)
                except DynamoError:
                    pass  # unsatisfiable (the keywords were checked up front): leave it out
        for name in required:
            if name in out:
                continue
            if extra is False:
                raise _invalid(
                    f"required property {name!r} is neither in properties nor allowed by "
                    "additionalProperties", path,
                )
            out[name] = self._extra_value(extra, f"{path}/additionalProperties", depth)
        if not props and not required and extra is not False and not shallow:
            for i in range(self.rng.randint(1, _OPEN_PROPERTIES)):
                key = f"{self._word(3, 8)}{i}"
                out[key] = self._extra_value(extra, f"{path}/additionalProperties", depth)
        return out

    def _extra_value(self, extra: Any, path: str, depth: int) -> Any:
        if extra is True:  # any value: a short string reads best in a demo
            return self._word(3, 8)
        return self.value(extra, path, depth + 1)

    def _array(self, schema: Mapping[str, Any], path: str, depth: int) -> list[Any]:
        items = schema.get("items", True)
        if isinstance(items, list):
            raise _invalid("items as an array (tuple form) is not supported", path)
        lo = _count(schema, "minItems", 0, path)
        hi = _count(schema, "maxItems", lo + _ARRAY_SPAN, path)
        if lo > hi:
            raise _invalid(f"minItems {lo} > maxItems {hi}", path)
        n = lo if depth >= _SHALLOW else self.rng.randint(lo, min(hi, lo + _ARRAY_SPAN))
        if items is True:
            return [self._word(3, 8) for _ in range(n)]
        return [self.value(items, f"{path}/items", depth + 1) for _ in range(n)]

    def _string(self, schema: Mapping[str, Any], path: str) -> str:
        lo = _count(schema, "minLength", 0, path)
        hi = _count(schema, "maxLength", lo + _STRING_SPAN, path)
        if lo > hi:
            raise _invalid(f"minLength {lo} > maxLength {hi}", path)
        return self._word(lo, min(hi, lo + _STRING_SPAN))

    def _bounds(self, schema: Mapping[str, Any], path: str) -> tuple[float, float, bool, bool]:
        """(low, high, low exclusive, high exclusive); missing sides are filled in."""
        def num(key: str) -> float | None:
            v = schema.get(key)
            if v is None:
                return None
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                raise _invalid(f"{key} must be a finite number, not {v!r}", path)
            return float(v)

        lo, hi = num("minimum"), num("maximum")
        xlo, xhi = num("exclusiveMinimum"), num("exclusiveMaximum")
        lo_open = xlo is not None and (lo is None or xlo >= lo)
        if lo_open:
            lo = xlo
        hi_open = xhi is not None and (hi is None or xhi <= hi)
        if hi_open:
            hi = xhi
        if lo is None and hi is None:
            lo, hi = 0.0, float(_NUMBER_SPAN)
        elif lo is None:
            assert hi is not None
            lo = hi - _NUMBER_SPAN
        elif hi is None:
            hi = lo + _NUMBER_SPAN
        assert lo is not None and hi is not None
        return lo, hi, lo_open, hi_open

    def _integer(self, schema: Mapping[str, Any], path: str) -> int:
        lo, hi, lo_open, hi_open = self._bounds(schema, path)
        ilo = math.floor(lo) + 1 if lo_open else math.ceil(lo)
        ihi = math.ceil(hi) - 1 if hi_open else math.floor(hi)
        if ilo > ihi:
            raise _invalid(f"no integer lies in the range {lo} .. {hi}", path)
        return self.rng.randint(ilo, ihi)

    def _number(self, schema: Mapping[str, Any], path: str) -> float:
        lo, hi, lo_open, hi_open = self._bounds(schema, path)
        if lo > hi or (lo == hi and (lo_open or hi_open)):
            raise _invalid(f"no number lies in the range {lo} .. {hi}", path)
        # Two decimals read like real data; rounding can cross a bound, then the midpoint
        # (strictly inside an open range) or the bound itself (a closed one) is used.
        x = round(self.rng.uniform(lo, hi), 2)
        if x < lo or x > hi or (lo_open and x == lo) or (hi_open and x == hi):
            x = (lo + hi) / 2 if (lo_open or hi_open) else lo
        return x

    def _word(self, lo: int, hi: int) -> str:
        n = self.rng.randint(lo, max(lo, hi))
        return "".join(self.rng.choice(_ALPHABET) for _ in range(n))


def _checked(schema: Any, path: str) -> Mapping[str, Any]:
    """``schema`` as a mapping (``true`` = ``{}``), every keyword known; else InvalidArgument."""
    if schema is True:
        return {}
    if schema is False:
        raise _invalid("the schema false admits no value", path)
    if not isinstance(schema, Mapping):
        raise _invalid(f"a schema must be an object or a boolean, not {schema!r}", path)
    for key in schema:
        if key not in SUPPORTED_KEYWORDS and key not in _IGNORED and not key.startswith("x-"):
            raise _invalid(f"unsupported JSON schema keyword {key!r}", path)
    return schema


def _count(schema: Mapping[str, Any], key: str, default: int, path: str) -> int:
    v = schema.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise _invalid(f"{key} must be a non-negative integer, not {v!r}", path)
    return v


def guided_text(guided: GuidedDecodingOptions, rng: random.Random) -> str | None:
    """The output the mocker gives a guided request, or None when nothing is constrained.

    ``json`` (a schema, or its JSON text): :func:`instance_for_schema`, as compact JSON (no
    whitespace, so any ``whitespace_pattern`` that allows none is met; the pattern itself is
    not read). ``choice``: one of the strings. ``regex``, ``grammar``, ``structural_tag`` or
    more than one kind raise ``DynamoError(InvalidArgument)``; ``backend`` is ignored.
    """
    if guided.structural_tag is not None:
        raise DynamoError.invalid_argument("guided decoding: the mocker has no structural_tag")
    kinds = [k for k in ("json", "regex", "choice", "grammar") if getattr(guided, k) is not None]
    if not kinds:
        return None
    if len(kinds) > 1:
        raise DynamoError.invalid_argument(
            f"guided decoding: give one of json, choice; got {', '.join(kinds)}"
        )
    kind = kinds[0]
    if kind in ("regex", "grammar"):
        raise DynamoError.invalid_argument(
            f"guided decoding: the mocker honours json and choice, not {kind}"
        )
    if kind == "choice":
        choices = guided.choice
        if not choices or not all(isinstance(c, str) for c in choices):
            raise DynamoError.invalid_argument(
                "guided decoding: choice must be a non-empty list of strings"
            )
        return rng.choice(choices)
    schema = guided.json
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as exc:
            raise DynamoError.invalid_argument(
                f"guided decoding: json is not valid JSON: {exc}"
            ) from exc
    if not isinstance(schema, Mapping | bool):
        raise DynamoError.invalid_argument("guided decoding: json must be a JSON schema object")
    value = instance_for_schema(schema, rng)
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


class ScriptedSequence(Sequence):
    """A :class:`~.scheduler.Sequence` that emits ``script`` instead of random tokens.

    Scheduling, KV blocks and step costs are those of any sequence (the scheduler cannot tell
    them apart). Each sample emits the next script token, counted by output tokens so far, so a
    preempted and recomputed sequence resumes where it was. After the last one the sequence
    ends with ``eos`` (also before ``min_tokens``: nothing valid could follow), unless
    ``max_tokens`` or ``max_len`` ended it with ``length`` first; stop token ids still end it
    with ``stop``. ``eos_rate`` does not apply: the script decides the length.
    """

    __slots__ = ("script",)

    def __init__(
        self,
        request_id: str,
        prompt: list[int],
        rules: StopRules,
        *,
        block_size: int,
        seed: int,
        vocab_size: int,
        script: list[int],
    ) -> None:
        super().__init__(
            request_id, prompt, rules, block_size=block_size, seed=seed, vocab_size=vocab_size
        )
        self.script = script

    def sample(self) -> bool:
        rules = self.rules
        n_out = self.num_output
        script = self.script
        if n_out >= len(script):  # an empty script (choice ""): done before any token
            return self._finish(FinishReason.EOS)
        token = script[n_out]
        if n_out >= rules.min_tokens:
            if token in rules.stop_hidden:
                self.stop_reason = token
                return self._finish(FinishReason.STOP)
            if token in rules.stop_visible:
                self._append(token)
                self.stop_reason = token
                return self._finish(FinishReason.STOP)
        self._append(token)
        if n_out + 1 == len(script):
            # Complete: eos even when this token also reached max_tokens (the output is whole).
            return self._finish(FinishReason.EOS)
        if n_out + 1 >= rules.max_tokens or len(self.tokens) >= rules.max_len:
            return self._finish(FinishReason.LENGTH)
        self.notify()
        return False
