"""balance_routers, Before/Expected: the correction bias moves under pre-training, stays put under an adapter."""

from k2c.ir import Graph, Op, OpKind
from k2c.passes import balance_routers
from k2c.spec.schema import Adapter


def before(balance: str, adapter: Adapter) -> Graph:
    g = Graph("t")
    ids = g.add(Op.make(OpKind.INPUT, "ids"))
    router = g.add(Op.make(OpKind.ROUTER, "layers.1.router", layer=1, balance=balance, balance_rate=0.001), ids)
    g.add(Op.make(OpKind.LOSS, "loss"), router, ids)
    return g.with_facts(adapter=adapter)


def expected(balance: str, bias_rate: float, adapter: Adapter) -> str:
    return (
        "graph t {\n"
        "  ids = input()  <- ()\n"
        f"  layers.1.router = router(balance={balance!r}, balance_rate=0.001, bias_rate={bias_rate!r}, layer=1)"
        "  <- (ids)\n"
        "  loss = loss()  <- (layers.1.router, ids)\n"
        f"  fact adapter = {adapter!r}\n"
        "}\n"
    )


def test_pretraining_moves_the_bias_at_the_spec_rate():
    adapter = Adapter()
    assert balance_routers(before("aux_free_bias", adapter)).text() == expected("aux_free_bias", 0.001, adapter)


def test_an_adapter_freezes_the_bias():
    adapter = Adapter.model_validate({"kind": "lora", "targets": [{"match": "attn.o"}]})
    assert balance_routers(before("aux_free_bias", adapter)).text() == expected("aux_free_bias", 0.0, adapter)


def test_balancing_off():
    adapter = Adapter()
    assert balance_routers(before("none", adapter)).text() == expected("none", 0.0, adapter)
