"""The one place where a model_id becomes a filesystem path."""

from __future__ import annotations

import os
import re
from pathlib import Path

from gpud.errors import InvalidRequest

MAX_MODEL_ID_LENGTH = 128
# One path component: starts with a letter or digit (so never ".", "..", or one of the store's own dot-names
# such as ".tmp-*"), then letters, digits, ".", "_", "-". No "/", "\\", "%", NUL or whitespace can get through.
MODEL_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def validate_model_id(model_id: object) -> str:
    """Return model_id if it is a well-formed id, else raise InvalidRequest(code="invalid_model_id")."""
    if not isinstance(model_id, str):
        raise InvalidRequest("model_id must be a string", code="invalid_model_id")
    if not model_id or len(model_id) > MAX_MODEL_ID_LENGTH:
        raise InvalidRequest(f"model_id must be 1 to {MAX_MODEL_ID_LENGTH} characters long", code="invalid_model_id")
    # ".." inside an id is harmless as one component, but refusing it keeps ids unambiguous in logs and URLs.
    if not MODEL_ID_PATTERN.fullmatch(model_id) or ".." in model_id:
        raise InvalidRequest(
            f"model_id {model_id!r} is not allowed: use letters, digits, '.', '_' and '-' "
            "(starting with a letter or digit)",
            code="invalid_model_id",
        )
    return model_id


def model_path(cache_dir: Path, model_id: object) -> Path:
    """The model's directory under cache_dir: pattern-checked, and refused if it resolves outside the cache."""
    checked = validate_model_id(model_id)
    root = Path(os.path.realpath(cache_dir))
    candidate = root / checked
    # The pattern already forbids separators; the resolved-prefix check also catches a symlink placed in
    # the cache that points elsewhere (or a link chain), so no caller ever touches a file outside the cache.
    resolved = Path(os.path.realpath(candidate))
    if resolved != candidate:
        # Outside the cache is the attack; a link to a sibling inside would let two ids share (and evict) one
        # directory. Either way the id is refused.
        where = "inside" if resolved.is_relative_to(root) else "outside"
        raise InvalidRequest(
            f"model_id {checked!r} is a link that resolves {where} the model cache", code="invalid_model_id"
        )
    return candidate
