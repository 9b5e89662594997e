"""Export: write a model in a deployment format, then prove it in that format's real runtime.

Layout (issue 5):
  dense.py       a compressed model's effective float weights under their Hugging Face names,
                 and the quantized layers whose codes can be carried without a second rounding
  kquants.py     llama.cpp's k-quant packers (Q4_K, Q5_K, Q6_K), checked against gguf's dequantizers
  mixes.py       which GGUF type each tensor gets (Q4_K_M / Q5_K_M mixes, llama.cpp's fallbacks)
  gguf.py        the GGUF writer for the Llama and GPT-2 architectures (tensor names, hparams, tokenizer)
  onnx.py        ONNX export (dynamic batch/sequence; QDQ int8, MatMulNBits 4-bit)
  hf.py          a Hugging Face directory that transformers loads without shrink
  verify.py      load each artifact in its runtime and measure agreement with shrink's model
"""
