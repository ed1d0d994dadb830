"""The personalized model in llama.cpp: a fedmoe export written as one GGUF file
(:mod:`fedmoe.llamacpp.export`, with the ``gguf`` package) and run through llama-cpp-python
(:mod:`fedmoe.llamacpp.runtime`: load, greedy decoding, tokenization, k-quant quantization).

Importing this package imports nothing heavy: the runtime module loads llama.cpp without torch,
so a process that only runs the GGUF (``scripts/bench_gguf.py``'s llama.cpp contenders) holds
what a device running llama.cpp holds.
"""
