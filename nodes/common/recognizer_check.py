"""Where an IDENTITY meets an ID_ADAPTER: was the identity made with the recognizer the adapter was trained on?

One mechanism for every node that turns an identity into tokens (they all go through
``identity_inputs.identity_tokens`` / ``identity_token_inputs.identity_tokens`` /
``personalization.identity_tokens``, which call :func:`check_recognizer`):

- the adapter says which embedding space it needs (``adapters/recognizer_identity.expected_space``:
  the manifest entry's ``requires``, recorded by Load identity adapter, else the file's format);
- the identity says which recognizer made it (``Identity.recognizer_id``, from Load face analysis model);
- the policy is the ``recognizer_check`` input of Load identity adapter, carried in the ID_ADAPTER
  (``extras["recognizer_check"]``): ``error`` (default) stops on a mismatch with the fix; ``warn``
  logs it and goes on; ``off`` does not look. An identity whose recognizer the pack cannot
  identify is only logged (Load face analysis model's info shows the warning on the canvas).
"""

from __future__ import annotations

import logging

from ...adapters.projectors.id_adapter import IdAdapter
from ...adapters.faces.identity import Identity
from ...adapters.faces.recognizer_identity import FORMAT_WORDS, RECOGNIZER_CHECKS, expected_space, pairing_verdict
from .errors import IdentityAttentionError

LOG = logging.getLogger("identity_attention")
POLICY_KEY = "recognizer_check"
EXPECTED_KEY = "face_pack"  # set by the loader from the manifest entry's requires


def adapter_expected_space(adapter: IdAdapter):
    """The embedding space the adapter was trained on, or None when it needs no particular recognizer."""
    recorded = adapter.extras.get(EXPECTED_KEY)
    if recorded:
        return recorded
    return expected_space(adapter.format, adapter.metadata.get("source_format"))


def check_recognizer(adapter: IdAdapter, identity: Identity, node: str, adapter_input: str = "id_adapter",
                     identity_input: str = "identity") -> str:
    """Raise on a mismatch under policy ``error``; log under ``warn`` and for unknown recognizers. Returns the status."""
    policy = str(adapter.extras.get(POLICY_KEY, "error"))
    if policy not in RECOGNIZER_CHECKS:
        policy = "error"
    expected = adapter_expected_space(adapter)
    fmt = adapter.metadata.get("source_format") if adapter.format == "native" else adapter.format
    words = FORMAT_WORDS.get(fmt, fmt or adapter.format)
    verdict = pairing_verdict(expected, getattr(identity, "recognizer_id", None), words,
                              getattr(identity, "recognizer", "unknown"), policy)
    if verdict.status == "mismatch":
        if policy == "error":
            raise IdentityAttentionError(verdict.message, node=node, input_name=identity_input, fix=verdict.fix)
        LOG.warning("[Identity Attention] %s: %s (recognizer_check is 'warn', so the run goes on)", node, verdict.message)
    elif verdict.status == "unknown":
        LOG.warning("[Identity Attention] %s: %s", node, verdict.message)
    return verdict.status
