"""The toy world: what command 1 (toy.py) builds and studies.

  pretrain.py  a tiny VAE and CLIP (and the U-Net as a text-to-image prior) on procedural scenes
  world.py     the stages, saved in the real formats, then train.py's toy preset on top
  studies.py   the toy studies (--study=prior, --study=e2e, --study=ceiling), resumable by cell (docs/study_cells.jsonl)
  ceiling.py   where a checkpoint's mIoU goes on the way to the VAE's ceiling (the error budget)
  cells.py     the studies' results file, one line per finished cell

The scenes themselves are a dataset like the others: data/toy.py.
"""
