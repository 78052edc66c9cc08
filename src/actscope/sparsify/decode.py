"""Greedy decoding over a static KV cache, each step one CUDA graph replay: where sparsity pays on a GPU.

HF's ``generate`` runs every decoding step as Python that launches hundreds of small kernels.
On a GPU those launches, not reading the weights, set the time of a step, and a sparse kernel
can only speed up what is left once they are gone: without graphs, sparse decoding on a GPU is
slower than dense (docs/sparsify.md, "Decoding fast on a GPU"; figures in docs/benchmarks.md,
"On a GPU"). ``greedy_decode`` captures one step of the model, sparsified or not, over HF's
``StaticCache`` and replays it. On CPU, or with ``cuda_graph=False``, it runs the same loop
eagerly, which is also how it is tested to reproduce HF's greedy ``generate``.

``compile=True`` also runs each step through ``torch.compile``, which fuses the small operations
between the linears (norms, rotary embeddings, residual adds). A sparsified linear is one
operator inside that graph (``sparsify/ops.py``), so the step has no graph break. It decoded
the same tokens as the uncompiled loop on the test model and on SmolLM2, but fused kernels may
round differently, so exact equality is not promised. ``cpp_wrapper=True`` also has Inductor
write the code that calls a step's kernels in C++ instead of Python: on CPU that made dense
decoding of the default model 3-6% faster and sparse decoding no faster (its kernels are already
called from C++), for a first compile of about two minutes per configuration instead of about
ten seconds (Inductor caches it on disk). Compiling is paid once per decoder (less
once Inductor's cache is warm); on CPU the compiled step is faster, dense and sparse alike, so
the sparse gain holds on top of it (docs/benchmarks.md, "Activation sparsity", compiled
decoding). On a GPU, where those small operations are most of a step once the linears are
sparse, it has not been measured yet. Each compiled decoder adds a variant of the step to
``torch._dynamo``'s cache, which holds ``torch._dynamo.config.recompile_limit`` of them (8 by
default) before falling back to eager code; keep one decoder per configuration.

The graph freezes whatever the model does in one step, so hooks that keep Python state across
steps (steering on generated positions only, CoreInfer's prompt detection) must not be active
inside it. ``sparsify.apply`` with the threshold methods keeps every threshold and counter on
the device and makes no host synchronisation while decoding on a GPU; TEAL's graph decoding was
checked against eager decoding on an H100 (tests/test_sparse_decoding.py), the others were not.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import SparsifyError
from ..kvcache import with_cache


class StaticDecoder:
    """Greedy decoding of ``[batch, prompt]`` token ids for a fixed number of new tokens."""

    def __init__(self, model: nn.Module, batch: int, max_len: int, cuda_graph: bool | None = None,
                 compile: bool = False, cpp_wrapper: bool = False):
        from transformers import StaticCache

        self.model = model
        self.device = next(model.parameters()).device
        self.cuda_graph = self.device.type == "cuda" if cuda_graph is None else cuda_graph
        if self.cuda_graph and self.device.type != "cuda":
            raise SparsifyError("cuda_graph=True needs the model on a CUDA device")
        self.cache = StaticCache(config=model.config, max_cache_len=max_len)
        self.max_len = max_len
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=self.device)
        self.pos = torch.zeros(1, dtype=torch.long, device=self.device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None
        self.compile = compile
        self.cpp_wrapper = cpp_wrapper
        if cpp_wrapper and not compile:
            raise SparsifyError("cpp_wrapper=True is an option of compile=True")
        self._compiled = None

    def _forward(self) -> torch.Tensor:
        out = self.model(input_ids=self.ids, **with_cache(self.cache), cache_position=self.pos, use_cache=True)
        return out.logits[:, -1]

    def _step(self) -> torch.Tensor:
        return self._compiled() if self._compiled is not None else self._forward()

    def _compile(self, prompt: torch.Tensor) -> None:
        # one eager step first, so layers make their lazy state (e.g. transposed weights) outside
        # the graph; the cache is reset by the next prefill (a second call at the same position
        # would not be a no-op: the static cache counts what it has seen)
        self._prefill(prompt)
        self._forward()
        options = {"cpp_wrapper": True} if self.cpp_wrapper else None
        self._compiled = torch.compile(self._forward, dynamic=False, options=options)

    def _prefill(self, prompt: torch.Tensor) -> None:
        self.cache.reset()
        n = prompt.shape[1]
        out = self.model(input_ids=prompt, **with_cache(self.cache),
                         cache_position=torch.arange(n, device=self.device), use_cache=True)
        self.ids.copy_(out.logits[:, -1:].argmax(-1))
        self.pos.fill_(n)

    def _capture(self, prompt: torch.Tensor) -> None:
        self._prefill(prompt)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # warm-up off the capture stream, as CUDA graphs require
            for _ in range(2):
                self._step()
        torch.cuda.current_stream(self.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._step()

    @torch.inference_mode()
    def generate(self, prompt: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """``[batch, prompt + max_new_tokens]``: the prompt and its greedy continuation."""
        prompt = prompt.to(self.device)
        if prompt.dim() != 2 or prompt.shape[0] != self.ids.shape[0]:
            raise SparsifyError(f"expected prompt ids of shape [{self.ids.shape[0]}, length], got {tuple(prompt.shape)}")
        if prompt.shape[1] + max_new_tokens > self.max_len:
            raise SparsifyError(f"prompt ({prompt.shape[1]}) + max_new_tokens ({max_new_tokens}) exceeds the "
                                f"cache length {self.max_len}")
        if max_new_tokens < 1:
            return prompt
        if self.compile and self._compiled is None:
            self._compile(prompt)
        if self.cuda_graph and self.graph is None:
            self._capture(prompt)
        self._prefill(prompt)
        new = [self.ids.clone()]
        for i in range(max_new_tokens - 1):
            if self.graph is not None:
                self.graph.replay()
                logits = self.logits
            else:
                logits = self._step()
            self.ids.copy_(logits.argmax(-1, keepdim=True))
            self.pos.fill_(prompt.shape[1] + i + 1)
            new.append(self.ids.clone())
        return torch.cat([prompt, *new], dim=1)


def greedy_decode(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int,
                  cuda_graph: bool | None = None, compile: bool = False, cpp_wrapper: bool = False) -> torch.Tensor:
    """Greedy continuation of ``input_ids`` (``[batch, length]``, no padding), ``max_new_tokens`` long.

    On CUDA each step is one CUDA-graph replay (``cuda_graph=None`` picks it by device). For
    repeated calls with the same shapes keep a ``StaticDecoder``: it captures once.
    """
    dec = StaticDecoder(model, input_ids.shape[0], input_ids.shape[1] + max_new_tokens, cuda_graph, compile,
                        cpp_wrapper)
    return dec.generate(input_ids, max_new_tokens)
