"""The run folder, linernotes' central object: `Run` owns its layout, loading and saving,
derived runs, the training set and the Fisher lookup (`folder.py`); `Retrainer` is the one cache
of the recipe retrained without some tracks (`retrain.py`)."""

from linernotes.run.folder import Layout, Run, load_run, write_config
from linernotes.run.retrain import BudgetExhausted, Retrainer, retrain_record, retrain_seconds

__all__ = ["BudgetExhausted", "Layout", "Retrainer", "Run", "load_run", "retrain_record",
           "retrain_seconds", "write_config"]
