"""`k2c inspect`'s tables: layers that share a decision print as one row with their spans."""

from k2c.codegen import compile_spec
from k2c.report import by_layer_spans, inspect_json, inspect_text
from specs_for_tests import tiny_spec


def test_layers_with_the_same_columns_share_a_row():
    rows = [(0, "a"), (1, "a"), (2, "b"), (3, "a"), (5, "a"), (6, "b")]
    assert by_layer_spans(rows) == [("0-1,3,5", "a"), ("2,6", "b")]


def test_adapter_table_groups_sites_by_layer_span():
    spec = tiny_spec(adapter={"kind": "ce_lora", "rank": 4,
                              "targets": [{"match": "experts.up", "layers": "2", "keep_ratio": 0.25}]})
    text = inspect_text(spec, compile_spec(spec))
    lines = [line.split() for line in text.splitlines()]
    assert ["2", "experts.up", "32x64", "ce_lora", "4", "0.25", "3", "8"] == lines[
        next(i for i, row in enumerate(lines) if row[:2] == ["2", "experts.up"])][:8]
    assert ["1", "experts.up", "32x64", "frozen"] in [row[:4] for row in lines]
    assert ["0-2", "scale", "100.0"] in [row[:3] for row in lines]  # QK-Clip on frozen q/k: one row for all layers


def test_json_lists_every_site():
    spec = tiny_spec(adapter={"kind": "lora", "targets": [{"match": "attn.o"}]})
    sites = inspect_json(spec, compile_spec(spec))["adapter_sites"]
    assert [s["site"] for s in sites if s["kind"] == "lora"] == [f"layers.{i}.attn.o" for i in range(3)]


def test_kernel_table_says_where_fused_ops_run():
    spec = tiny_spec()
    rows = inspect_json(spec, compile_spec(spec))["kernels"]
    # 3 layers: two residual adds each, run by the norms after them (the last by the final norm)
    assert {"op_kind": "add", "kernel": "torch", "fused_into": "rmsnorm (triton)", "ops": 6} in rows
    assert {"op_kind": "rmsnorm", "kernel": "triton", "fused_into": None, "ops": 13} in rows
    assert ["add", "torch", "rmsnorm", "(triton)", "6"] in [line.split() for line in
                                                           inspect_text(spec, compile_spec(spec)).splitlines()]


def test_optimizer_table_says_which_matrices_take_the_gram_form():
    spec = tiny_spec(**{"optimizer.muon.newton_schulz": "gram"})
    rows = inspect_json(spec, compile_spec(spec))["param_groups"]
    muon = {(r["op_kind"], r["newton_schulz"]): r["tensors"] for r in rows if r["optimizer"] == "muon"}
    # per layer: o_proj [64, 64] square, so standard; q_a, q_b, kv_a, kv_b and the MLPs' matrices wide or tall
    assert muon == {("linear", "gram"): 4 * 3 + 3 + 3 * 2, ("linear", "standard"): 3, ("expert_linear", "gram"): 6}
    assert all(r["newton_schulz"] is None for r in rows if r["optimizer"] == "adamw")
    lines = [line.split() for line in inspect_text(spec, compile_spec(spec)).splitlines()]
    assert ["muon", "yes", "linear", "standard", "3"] in [row[:5] for row in lines]
