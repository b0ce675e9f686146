"""ReLoRA's settings (`method=relora`): a bad one names its key before anything runs."""
import pytest

from lowrank.config import validate
from lowrank.errors import ConfigError
from tests.conftest import compose_cfg


@pytest.mark.parametrize("overrides, key", [(["method.relora_every=0"], "method.relora_every"),
                                            (["method.init=pissa"], "method.init=pissa"),
                                            (["trainer.optimizer=flat_master"], "trainer.optimizer=flat_master"),
                                            (["trainer.parallel=ddp"], "trainer.parallel=ddp")])
def test_bad_relora_settings_name_their_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(compose_cfg(["method=relora", *overrides]))
