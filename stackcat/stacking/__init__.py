"""The out-of-fold stack: the job engine (:mod:`.jobs`), the meta choice (:mod:`.meta_choice`)
and the estimator, :class:`~stackcat.stacking.estimator.StackingCategorizer` (:mod:`.estimator`).

For every base model and every stratified fold, a clone is fitted on the
other folds and predicts the held-out fold; the held-out predictions of all
folds form the model's out-of-fold (OOF) probability matrix. A meta-learner
(see :mod:`stackcat.meta`) is fitted on those matrices.
"""

from stackcat.stacking.estimator import STACKER_FILE, Evaluation, StackingCategorizer
from stackcat.stacking.jobs import (
           Job,
           JobResult,
           load_job,
           make_folds,
           predict_aligned,
           run_job,
           take_rows,
)
from stackcat.stacking.meta_choice import accepted, choose_meta, nested_meta_oof

__all__ = ["STACKER_FILE", "Evaluation", "Job", "JobResult", "StackingCategorizer", "accepted", "choose_meta",
           "load_job", "make_folds", "nested_meta_oof", "predict_aligned", "run_job", "take_rows"]
