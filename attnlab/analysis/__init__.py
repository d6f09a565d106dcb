"""The RNN / dynamical-systems view of every attention variant.

* `forms`: the common form of a layer (scalar/diagonal, delta, kernel) and how
  to run it recurrently or in parallel, and its implicit attention matrix;
* `collect`: reads the forms out of a model's real layers, through the
  analysis adapter each variant registers next to its mixer
  (`attnlab.models.attention.common_form.Adapter`);
* `quantities`: eigenvalues, spectrum histograms, decay and memory horizons,
  per-query attention statistics, state statistics;
* `taylor`: softmax attention as a sum of RNNs and its truncation error;
* `report`: all of the above on a model, with a JSON summary;
* `plots`: PNG figures (imports matplotlib lazily).

`python -m attnlab.analyze --workdir=DIR` runs it on a trained workdir.
"""

from attnlab.analysis.collect import capture_layers, layer_forms, layer_readout
from attnlab.analysis.forms import (
  DeltaForm,
  KernelForm,
  ScalarForm,
  effective_attention,
  implicit_attention,
  run_parallel,
  run_recurrent,
)
from attnlab.models.attention.common_form import Adapter

__all__ = [
  "Adapter",
  "DeltaForm",
  "KernelForm",
  "ScalarForm",
  "capture_layers",
  "effective_attention",
  "implicit_attention",
  "layer_forms",
  "layer_readout",
  "run_parallel",
  "run_recurrent",
]
