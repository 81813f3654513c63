"""NOT LIBRARY CODE: a measured prototype kept for the next step (see LOSSES.md).

Prototype: row-blocked NT-Xent (anchors == candidates), value+grad in 3 matmul-equivalents.

Forward scan over row blocks of anchors: s_blk = a_blk @ n^T holds COMPLETE rows, so the
negative log-sum-exp L, the pair losses and W = dloss/dL come out of one pass (no online
lse, no second forward pass). Backward scan (symmetric: candidates are the anchors):
M = ds + ds^T is built elementwise from s_blk with L, W broadcast along rows and along
columns, and g_blk = M_blk @ n is an untransposed matmul.  Memory O(block * B).
"""
import functools, jax, jax.numpy as jnp
from jax import lax

STATIC_SHIFT = False

def normalize(x):
    return x * lax.rsqrt(jnp.maximum(jnp.sum(x * x, -1, keepdims=True), 1e-16))

def _blocks(x, bs):
    return x.reshape((x.shape[0] // bs, bs) + x.shape[1:])

def _core(n, labels, inv_t, bs):
    B = n.shape[0]
    a = n * inv_t
    idx = jnp.arange(B)
    def fwd_step(_, blk):
        a_b, lab_b, idx_b = blk
        s = a_b @ n.T                                    # [bs, B]
        same = lab_b[:, None] == labels[None, :]
        pos = same & (idx_b[:, None] != idx[None, :])
        if STATIC_SHIFT:   # cosine <= 1, so s <= inv_t; exp(s - inv_t) >= exp(-2 inv_t) > 0 for t > 0.023
            m = jnp.full((s.shape[0],), inv_t, s.dtype)
        else:
            m = jnp.max(jnp.where(same, -jnp.inf, s), axis=1)
            m = jnp.where(jnp.isfinite(m), m, 0.)
        l = jnp.sum(jnp.where(same, 0., jnp.exp(s - m[:, None])), axis=1)
        L = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.)), jnp.inf)
        z = L[:, None] - s
        sp = jnp.sum(jnp.where(pos, jax.nn.softplus(z), 0.), axis=1)
        W = jnp.sum(jnp.where(pos, jax.nn.sigmoid(z), 0.), axis=1)
        npos = jnp.sum(pos, axis=1)
        has_neg = l > 0
        return None, (jnp.where(has_neg, sp, 0.), jnp.where(has_neg, W, 0.), L, npos)
    _, (sp, W, L, npos) = lax.scan(fwd_step, None, (_blocks(a, bs), _blocks(labels, bs), _blocks(idx, bs)))
    sp, W, L, npos = sp.reshape(-1), W.reshape(-1), L.reshape(-1), npos.reshape(-1)
    cnt = jnp.maximum(jnp.sum(npos), 1).astype(n.dtype)
    def bwd_step(_, blk):
        a_b, lab_b, idx_b, L_b, W_b = blk
        s = a_b @ n.T
        same = lab_b[:, None] == labels[None, :]
        pos = same & (idx_b[:, None] != idx[None, :])
        e_r = jnp.exp(s - L_b[:, None]); e_c = jnp.exp(s - L[None, :])   # L=+inf rows -> 0
        M = jnp.where(pos, -(1. / (1. + e_r) + 1. / (1. + e_c)),
                      jnp.where(same, 0., W_b[:, None] * e_r + W[None, :] * e_c))
        return None, M @ n
    _, g = lax.scan(bwd_step, None, (_blocks(a, bs), _blocks(labels, bs), _blocks(idx, bs),
                                     _blocks(L, bs), _blocks(W, bs)))
    return jnp.sum(sp) / cnt, inv_t * g.reshape(B, -1) / cnt

@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _loss(n, labels, inv_t, bs):
    return _core(n, labels, inv_t, bs)[0]
def _fwd(n, labels, inv_t, bs):
    v, g = _core(n, labels, inv_t, bs); return v, g
def _bwd(bs, g, ct):
    return ct * g, None, None
_loss.defvjp(_fwd, _bwd)

def nt_xent_rowblock(e, labels, temperature=0.1, block_size=512):
    B = e.shape[0]; bs = min(block_size, B); assert B % bs == 0
    return _loss(normalize(e), labels, 1.0 / temperature, bs)
