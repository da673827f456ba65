"""What the one-row distillation kernels (:mod:`kdops.backends.triton.kd`,
:mod:`kdops.backends.triton.sparse_kd`) share: their scalar options in the accumulation type,
the row's label, the student's online log-sum-exps, and the hard-label cross-entropy
``hard_weight * (logsumexp(s) - s[label])`` with its gradient
``hard_weight * (softmax(s) - onehot(label))`` (``s`` the transformed student logits)."""
import triton
import triton.language as tl

from kdops.backends.triton._common import exp_sum
from kdops.backends.triton.logit_transform import load_transformed


@triton.jit
def row_scalars(inv_temperature, beta, log_beta, log_1m_beta, hard_weight, soft_weight, student_scale,
                student_softcap, ACC: tl.constexpr):
    """The kernels' float64 scalar arguments in ACC (tl.full also takes the interpreter's Python
    floats): (1/T, beta, log beta, log(1 - beta), hard_weight, soft_weight, student scale, softcap)."""
    return (tl.full([], inv_temperature, ACC), tl.full([], beta, ACC), tl.full([], log_beta, ACC),
            tl.full([], log_1m_beta, ACC), tl.full([], hard_weight, ACC), tl.full([], soft_weight, ACC),
            tl.full([], student_scale, ACC), tl.full([], student_softcap, ACC))


@triton.jit
def row_label(labels_ptr, row, ignore_index, has_labels):
    """(label, ignored) of a row (int64, int1): (-1, False) without labels (``has_labels`` a
    runtime flag: both branches give the same types)."""
    label = tl.full([], -1, tl.int64)
    ignored = tl.full([], 0, tl.int1)
    if has_labels:
        label = tl.load(labels_ptr + row).to(tl.int64)
        ignored = label == ignore_index
    return label, ignored


@triton.jit
def student_lse_step(s, m_s, z_s, z_1, inv_t, has_hard):
    """The student's running max m_s and sums z_s = sum exp((s - m_s) / T), z_1 = sum exp(s - m_s)
    (with the runtime flag ``has_hard``) after the block ``s`` (lanes past V read -inf): (m_s, z_s, z_1)."""
    new_m = tl.maximum(m_s, tl.max(s, axis=0))
    z_s = exp_sum(z_s, m_s, new_m, s, inv_t)
    if has_hard:
        z_1 = exp_sum(z_1, m_s, new_m, s, 1.0)
    return new_m, z_s, z_1


@triton.jit
def hard_label_log_z(z_1, label, V):
    """(label_ok, log z_1): a label outside [0, V) makes log z_1, hence the row's loss and
    gradient, NaN (that label is never read)."""
    label_ok = (label >= 0) & (label < V)
    return label_ok, tl.where(label_ok, tl.log(z_1), float("nan"))


@triton.jit
def hard_label_loss(s_row, label, label_ok, m_s, log_z_1, hard_w, s_scale, s_cap, S_KIND: tl.constexpr,
                    ACC: tl.constexpr):
    """hard_weight * (m_s + log z_1 - s[label]) = hard_weight * CE(s, label)."""
    s_label = load_transformed(s_row + label, label_ok, 0.0, s_scale, s_cap, S_KIND, ACC)
    return hard_w * (m_s - s_label + log_z_1)


@triton.jit
def hard_label_grad(s, cols, label, m_s, log_z_1, hard_w):
    """hard_weight * (softmax(s) - onehot(label)) at the elements ``cols``."""
    return hard_w * (tl.exp(s - m_s - log_z_1) - tl.where(cols == label, 1.0, 0.0))
