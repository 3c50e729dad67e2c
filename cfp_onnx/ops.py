"""Named op families, so no op-type literal is scattered through the code."""

from __future__ import annotations

MS = "com.microsoft"
FUSED_CONV = frozenset({"FusedConv"})
"""com.microsoft's FusedConv (onnxruntime's extended optimisation) is a Conv with its
activation in an attribute and an optional sum input Z: act(conv(X) + Z)."""
CONV = frozenset({"Conv"}) | FUSED_CONV
DENSE = frozenset({"Gemm", "MatMul"})
SOFTMAX = frozenset({"Softmax", "LogSoftmax"})

# Element-wise on one feature tensor (any other operand a constant): channels pass through.
UNARY = frozenset(
    {
        "Relu", "LeakyRelu", "PRelu", "Elu", "Selu", "Celu", "Clip", "Tanh", "Sigmoid",
        "HardSigmoid", "HardSwish", "Gelu", "Erf", "Softplus", "Softsign", "Mish", "ThresholdedRelu",
        "Exp", "Log", "Neg", "Abs", "Sqrt", "Reciprocal", "Floor", "Ceil", "Round", "Sign",
        "Identity", "Dropout", "Cast", "CastLike", "BatchNormalization", "InstanceNormalization",
        "GroupNormalization", "LayerNormalization", "Swish", "QuantizeLinear", "DequantizeLinear",
    }
)  # fmt: skip

# Element-wise on several tensors: features combine channel by channel (union), constants pass.
ELEMENTWISE = frozenset({"Add", "Sum", "Sub", "Max", "Min", "Mean", "Mul", "Div", "Pow"})

WINDOW_POOL = frozenset({"MaxPool", "AveragePool", "LpPool"})
GLOBAL_POOL = frozenset({"GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"})
REDUCE = frozenset(
    {"ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceL1", "ReduceL2", "ReduceLogSumExp"}
)
RESIZE = frozenset({"Resize", "Upsample"})

# Move elements around: provenance follows each element to the channel it came from.
LAYOUT = frozenset(
    {"Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "DepthToSpace", "SpaceToDepth",
     "Expand", "Tile"}
)  # fmt: skip
SELECT = frozenset({"Concat", "Split", "Slice", "Gather", "Pad"})

# Between the classifier and the graph output: walked through to find the logits.
POST_LOGITS = frozenset(
    {"Softmax", "LogSoftmax", "Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze",
     "ReduceMean", "GlobalAveragePool", "Add", "Dropout", "Cast", "Transpose",
     "QuantizeLinear", "DequantizeLinear"}
)  # fmt: skip

# Between stacked dense layers of a head (C3D's fc6..fc8): ReLUs ignored, biases dropped.
HEAD_TRANSPARENT = frozenset(
    {"Relu", "Dropout", "Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Add", "Cast",
     "QuantizeLinear", "DequantizeLinear"}
)  # fmt: skip
