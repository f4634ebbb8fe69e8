"""ShapesWorld: a procedural world of flat-coloured shapes whose images can be judged exactly.

It exists so the whole SELMA loop can move a real faithfulness number on a CPU, offline: scenes
are generated and rendered deterministically from a seed, every scene has a ground-truth scene
graph and a caption from a small grammar, and a programmatic judge answers DSG-style questions
about any image of this world (ground-truth renders or a model's generations).

Modules:

* ``world``     the vocabulary (shapes, colours, sizes, counts, relations), scene sampling and
                rendering (64×64 by default, no anti-aliasing), captions from the grammar and
                their parser, the question grammar (DSG-style questions with dependencies, as
                :class:`selma_evaluation.types.Question` / ``EvalItem``) and seeded datasets.
* ``judge``     the programmatic VQA: palette segmentation, connected components, shape/size
                classification with merged-blob detection, yes/no answers to the question
                grammar, caption verification (the data-quality gate), and
                ``ShapesWorldJudgeVqa``, the ``shapesworld_judge`` backend of
                :func:`selma_evaluation.vqa.build_vqa`.
* ``model``     the base model: a small Stable-Diffusion-architecture pipeline for 64×64 renders
                (configs and builders).
* ``pretrain``  trains that base model from scratch, deterministically from a seed, on a CPU.
* ``grammar``   the prompt service's ``shapesworld_grammar`` LLM backend: new captions of the
                in-context examples' kinds, from the grammar.
* ``loop``      the SELMA loop in ShapesWorld through the real services: held-out prompt sets with
                inline questions, the judge gate, the mixed-data baseline and ``table``.
* ``cli``       ``selma shapesworld …`` (pretrain, eval-base, table, heldout, gate, mix).
* ``weights/``  the published base-model weights.

``world`` and ``judge`` need numpy, Pillow and scipy besides selma itself, and never import torch,
so the judge runs wherever evaluation runs.
"""
