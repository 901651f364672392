"""Request bodies: Content-Type, JSON syntax and JSON hygiene, checked before any schema or model work.

`json.loads` accepts things that later break deep inside the server: nesting deep enough to overflow the
recursion limit, integers past Python's int/str digit limit, and lone UTF-16 surrogates (`"\\ud800"`),
which no tokenizer can encode. Each is a 400 naming the parameter, here, once, for every route.
"""

from __future__ import annotations

import json
import re
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel

from ctxsteer.server.errors import CtxsteerError, bad_request, param_root

M = TypeVar("M", bound=BaseModel)
MAX_JSON_DEPTH = 64  # real requests nest 5 deep (messages[i].content[j].text); fuzzers go to thousands
_SURROGATE = re.compile("[\ud800-\udfff]")


async def read_json(request: Request, model: type[M]) -> M:
    """Parse the body as `model`: 415 for a non-JSON Content-Type, 400 for bad JSON or bad fields."""
    ctype = request.headers.get("content-type")
    if ctype is not None:
        mime = ctype.split(";", 1)[0].strip().lower()
        if mime != "application/json" and not mime.endswith("+json"):
            raise CtxsteerError(
                415,
                f"Content-Type must be application/json, got {mime or 'nothing'!r}.",
                code="unsupported_media_type",
            )
    obj = parse_json(await request.body())
    if not isinstance(obj, dict):
        raise bad_request("The request body must be a JSON object.", code="invalid_json")
    check_json(obj)
    return model.model_validate(obj)


def parse_json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except UnicodeDecodeError:
        raise bad_request("The request body is not valid UTF-8.", code="invalid_json") from None
    except json.JSONDecodeError as e:
        msg = f"The request body is not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})."
        raise bad_request(msg, code="invalid_json") from None
    except RecursionError:
        raise _too_deep(None) from None
    except ValueError:  # an integer literal longer than Python's int/str conversion limit (4300 digits)
        msg = "The request body has an integer with too many digits."
        raise bad_request(msg, code="invalid_json") from None


def check_json(obj: Any) -> None:
    """Walk the parsed body once (iteratively): depth <= MAX_JSON_DEPTH, no lone surrogates in any string."""
    stack: list[tuple[Any, str, int]] = [(obj, "", 0)]
    while stack:
        value, path, depth = stack.pop()
        if isinstance(value, str):
            if _SURROGATE.search(value):
                raise bad_request(
                    f"Invalid value for '{path}': the string contains a lone UTF-16 surrogate "
                    "(not valid Unicode text).",
                    path or None,
                    "invalid_unicode",
                )
        elif isinstance(value, dict | list):
            if depth >= MAX_JSON_DEPTH:
                raise _too_deep(param_root(path) or None)
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for key, child in items:
                if isinstance(key, str) and _SURROGATE.search(key):
                    raise bad_request(
                        f"A field name under '{path or 'the body'}' contains a lone UTF-16 surrogate.",
                        path or None,
                        "invalid_unicode",
                    )
                sub = f"{path}[{key}]" if isinstance(key, int) else (f"{path}.{key}" if path else key)
                stack.append((child, sub, depth + 1))


def _too_deep(param: str | None) -> CtxsteerError:
    return bad_request(
        f"The request body is nested more than {MAX_JSON_DEPTH} levels deep.", param, "invalid_json"
    )
