"""Data for attnlab: corpus -> tokens -> packed, checkpointable Grain batches; MQAR recall task.

Interface used by the training loop::

    default_data_config()                      the ``config.data`` block (see config.py)
    vocab_size(data_config) -> int             the model's vocabulary for it
    build_train_iterator(data_config, *, seq_len, batch_size, seed, workdir,
                         process_index=0, process_count=1) -> grain.DatasetIterator
    prepare_corpus(data_config, workdir=None, *, out_dir=None) -> str   (shards directory)

Batches are dicts of numpy ``[batch, seq_len]`` arrays: ``inputs``, ``targets`` (next token),
``segment_ids`` (documents from 1 within a row, 0 = padding), ``positions`` (from 0 at each
document start in the row, and at the row start for a document continued from the row
before), all int32, and float32 ``loss_mask``.

Corpus choice and licences. The default corpus needs no download: the Python standard
library's own ``.py`` source of the running interpreter ("stdlib": real code and docstrings,
about 12 MB without its tests on CPython 3.11, capped to 4 MB by default; licensed under the
Python Software Foundation License, PSF-2.0). For English prose, ``pydoc_data.topics``
("pydoc": the help topics of the Python documentation, about 0.5 MB, also PSF licence) ships
with every Python too. "files" reads the user's own text files (their licence is the user's
business). Prepared corpora record their licence in ``meta.json``. MQAR ("mqar" source) is synthetic and uses no data at all.

Prepare a corpus ahead of time with ``python -m attnlab.data.prepare --corpus=stdlib --out=DIR``
and point ``data.path`` at DIR; with ``data.path`` unset the iterator prepares the corpus once
into ``<workdir>/data/`` and reuses it.
"""
from attnlab.data.config import default_data_config
from attnlab.data.corpus_store import prepare_corpus
from attnlab.data.pipeline import build_train_iterator, vocab_size

__all__ = ["build_train_iterator", "default_data_config", "prepare_corpus", "vocab_size"]
