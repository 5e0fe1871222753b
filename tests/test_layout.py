"""formats/layout.py: the zero units other runtimes' shapes need change nothing."""
import pytest

import model as M
from formats import layout
from helpers import close, make_model, soft_masks, tiny_config, tokens_for


@pytest.mark.parametrize("multiple, uniform", [(1, False), (8, False), (1, True), (16, True)])
def test_pad_model_is_exact(multiple, uniform):
    """Zero units for other runtimes' shapes: fixed GQA groups, widths in multiples, equal layers; same logits."""
    config = tiny_config(n_heads=6, n_kv_heads=3, n_layers=4)
    m, tok = make_model(config), tokens_for(config)
    z = {**soft_masks(config)}
    z["z_head"][0, [0, 1]] = 0  # kv group 0 gone
    z["z_head"][1, [2, 5]] = 0  # groups of 2, 1, 1 query heads
    z["z_head"][2], z["z_int"][2] = 0, 0  # an empty layer
    z["z_int"][3, :10] = 0
    z["z_hid"][[1, 5, 30]] = 0
    small = M.slice_model(m, z)
    padded = layout.pad_model(small, multiple, uniform)
    c = padded.config
    for k in c.kv_of_head:  # query head h reads kv head h // group
        assert k == [h // (len(k) // (max(k) + 1)) for h in range(len(k))]
    assert c.dim % multiple == 0 and all(f % multiple == 0 for f in c.ffn_dims)
    if uniform:
        assert len({len(k) for k in c.kv_of_head}) == len(set(c.ffn_dims)) == 1 and c.ffn_dims[0] == c.ffn_dim
        assert (c.n_heads, c.n_kv_heads) == (len(c.kv_of_head[0]), max(c.kv_of_head[0]) + 1)
    else:  # layer 1: one kv head per query head (4 + 4 rows) costs less than groups of 2 with zero heads (6 + 3)
        assert c.kv_of_head[1] == [0, 1, 2, 3] and c.ffn_dims[2] == 0
    close(padded(tok), small(tok), 1e-12, "padded vs sliced")
