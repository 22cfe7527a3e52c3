"""The cost ledger's DiT part (benchmarks/dit_ledger.py) on the tiny Flux: deterministic counts."""

from __future__ import annotations

import pytest

from testkit import tiny_flux

pytestmark = pytest.mark.skipif(not tiny_flux.flux_available(), reason=tiny_flux.SKIP_REASON)


def test_flux_ledger_counts_the_dit_path():
    from benchmarks.dit_ledger import flux_table, measure_flux

    blocks, rows = measure_flux()
    assert blocks == tiny_flux.DEPTH + tiny_flux.DEPTH_SINGLE
    base = rows["flux_unpatched"].step
    assert rows["flux_weight0"].step.launches == base.launches  # weight 0 runs nothing of ours
    joint = rows["flux_joint_identity"].step
    assert joint.launches > base.launches
    assert joint.syncs == base.syncs and joint.h2d == base.h2d  # no host sync, no host copy per block
    cond = rows["flux_joint_identity_cond"].step
    assert cond.syncs == base.syncs and cond.h2d == base.h2d  # the cond-row mask is made once, not per block
    assert "flux_joint_identity" in flux_table(blocks, rows)


def test_flux_ledger_counts_the_carried_mechanisms():
    """KV-mixed, CA², MoA and nested on the DiT path: no host copy; no host sync per block (the
    recording stages, CA² and MoA, read the step's sigma once per model call)."""
    from benchmarks.dit_ledger import measure_flux

    names = ["flux_unpatched", "flux_kv_mixed_joint", "flux_kv_mixed_decoupled", "flux_ca2_gate", "flux_moa_over_joint_identity", "flux_nested_cond"]
    _, rows = measure_flux(names=names)
    base = rows["flux_unpatched"].step
    for name in names[1:]:
        step = rows[name].step
        assert step.launches > base.launches, name
        assert step.h2d == base.h2d, name
        assert step.syncs == base.syncs + (1 if name in ("flux_ca2_gate", "flux_moa_over_joint_identity") else 0), name
