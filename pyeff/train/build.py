"""Build model and data from a TrainConfig, and run the loop: what `pyeff train` and the
experiments call."""
from __future__ import annotations

from pyeff.train.checkpoint import seed_everything
from pyeff.train.config import TrainConfig


def load_data(config: TrainConfig, **dataset_kwargs):
    """(train_set, test_set) for config.dataset; extra kwargs go to pyeff.data.load_dataset."""
    from pyeff.data import load_dataset

    kw = dict(data_dir=config.data_dir, seed=config.seed, **dataset_kwargs)
    if config.image_size:
        kw["image_size"] = config.image_size
    return load_dataset(config.dataset, "train", **kw), load_dataset(config.dataset, "test", **kw)


def build_model(config: TrainConfig, train_set):
    """config.model from the pyeff model zoo, sized for the dataset, seeded by config.seed."""
    from pyeff.models import create_model

    seed_everything(config.seed)
    return create_model(config.model, num_classes=train_set.num_classes,
                        in_channels=train_set.images.shape[1])


def run_training(config: TrainConfig, hooks=(), model=None, data=None, verbose=True,
                 optimizer=None, criterion=None):
    """Load data, build the model (unless given), train, and return the finished Trainer."""
    from pyeff.train.loop import Trainer

    config.validate()
    train_set, test_set = data if data is not None else load_data(config)
    if model is None:
        model = build_model(config, train_set)
    trainer = Trainer(model, config, train_set, test_set, hooks=hooks, verbose=verbose,
                      optimizer=optimizer, criterion=criterion)
    try:
        trainer.fit()
    except BaseException:
        trainer.close(sync=False)
        raise
    trainer.close()
    return trainer
