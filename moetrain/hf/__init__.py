"""Hugging Face `transformers` export and import (tools/export_hf.py, tools/import_hf.py).

    mapping.py   pure: which transformers architecture reproduces a moetrain config, the config
                 translation both ways, and the tensor renames / permutations between our
                 consolidated state dict and the HF checkpoint's (torch only)
    files.py     file I/O: safetensors shards + index + config.json (+ tokenizer) in, and out

Nothing on the training path imports this package; `safetensors` is imported lazily by files.py,
and `transformers` is not needed at all to write or read the files (only to load them).
"""
