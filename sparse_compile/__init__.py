"""sparse_compile: weight-sparse networks, fast.

Inference: ``torch.compile(model, backend="sparse", options={...})`` (registered through the
``torch_dynamo_backends`` entry point, so no import of this package is needed) and
:func:`report` to see what happened to every linear layer. Training: ``sparse_compile.training``.
"""
