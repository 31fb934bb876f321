"""Imports everything gin files may name, so that bindings resolve.

trax registers its layers (`trax.layers.Relu`), optimizers
(`trax.optimizers.Adam`) and schedules (`multifactor`) with gin on import;
this project's configurables live in `training.model` and `training.run`.
"""

# pylint: disable=unused-import
import trax.layers
import trax.optimizers
import trax.supervised.lr_schedules

import blocks.mixing
import blocks.sharing
import blocks.switch
import feedback.data
import feedback.model
import primer_trax.layers
import primer_trax.models
import terraformer.models
import terraformer.terraformer
import training.model
import training.optimizers
import training.run
import training.seq2seq
