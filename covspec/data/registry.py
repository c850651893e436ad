"""One way in to every benchmark: ``load_benchmark(cfg.data)`` dispatches on ``data.benchmark``.

===========  ==========================================  =================================================
benchmark    ``data.path``                               metric (``sample.score``)
===========  ==========================================  =================================================
``shapes``   unused (synthetic, seeded)                  exact match of normalized words
``vqav2``    folder: questions, annotations, images      VQA accuracy, official normalization
``mmbench``  a TSV, or a folder holding one per split    option letter extracted from the answer
``mmmu``     folder of subject folders, or one parquet   option letter, or MMMU's open-answer match
===========  ==========================================  =================================================

File formats, layouts and split names: docs/benchmarks.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from covspec.errors import ConfigError

if TYPE_CHECKING:
    from covspec.config import DataConfig
    from covspec.data.sample import BenchmarkSample

__all__ = ["load_benchmark"]


def load_benchmark(data: DataConfig, seed: int = 0) -> list[BenchmarkSample]:
    """The samples that ``data`` selects: ``data.limit`` of them (fewer if the files hold fewer) from ``data.offset``.

    Args:
        data: the ``data`` config section (benchmark, path, split, limit, offset, kinds, subjects).
        seed: seed of the synthetic shapes benchmark (the config's top-level ``seed``); file benchmarks ignore it.

    Returns:
        Samples with ``sample_id``, ``split``, ``kind``, ``question`` (the prompt), ``answer``, ``image()`` and
        ``score(prediction)``. For ``shapes`` exactly ``covspec.data.shapes.load_split``'s samples.

    Raises:
        ConfigError: ``data.path`` is not set for a file benchmark, or the split does not exist for it.
        InputError: a missing file, folder or image, or a malformed row; the message names the file and row.
    """
    # Loaders are imported on use: the file benchmarks pull in pyarrow, csv and json parsing that shapes never needs.
    if data.benchmark == "shapes":
        from covspec.data.shapes import load_split

        return load_split(data.split, data.limit, seed=seed, offset=data.offset, kinds=data.kinds)
    if data.path is None:
        raise ConfigError(f"data.path must be set for data.benchmark={data.benchmark} (see docs/benchmarks.md)")
    if data.circular and data.benchmark != "mmbench":
        raise ConfigError(f"data.circular applies to data.benchmark=mmbench only, got data.benchmark={data.benchmark}")
    subjects = list(data.subjects)
    if subjects and data.benchmark != "mmmu":
        raise ConfigError(f"data.subjects applies to data.benchmark=mmmu only, got data.benchmark={data.benchmark}")
    if data.multi_image != "first" and data.benchmark != "mmmu":
        raise ConfigError(f"data.multi_image applies to data.benchmark=mmmu only, got data.benchmark={data.benchmark}")
    if data.benchmark == "vqav2":
        from covspec.data.vqav2 import load_vqav2

        return load_vqav2(data.path, data.split, data.limit, data.offset)
    if data.benchmark == "mmbench":
        from covspec.data.mmbench import load_mmbench

        return load_mmbench(data.path, data.split, data.limit, data.offset, circular=data.circular)
    if data.benchmark == "mmmu":
        from covspec.data.mmmu import load_mmmu

        return load_mmmu(data.path, data.split, data.limit, data.offset, subjects, data.multi_image)
    raise ConfigError(f"data.benchmark must be one of 'shapes', 'vqav2', 'mmbench', 'mmmu', got {data.benchmark!r}")
