"""Dataset strings, daemon config and attach options: mistakes name the key and what is accepted."""

from __future__ import annotations

import pytest

from prefetchd.config import Config
from prefetchd.dataset import parse_dataset
from prefetchd.errors import ConfigError, DatasetError
from prefetchd.options import resolve_options


def test_dataset_strings_parse_with_defaults():
    spec = parse_dataset("JUMPS3MultiView:bucket=cellpainting-gallery:prefix=/cpg0000-jump-pilot/source_4/images/")
    assert (spec.bucket, spec.prefix, spec.channels) == (
        "cellpainting-gallery", "cpg0000-jump-pilot/source_4/images", ("DNA", "ER", "RNA", "AGP", "Mito"))
    local = parse_dataset("JUMPLocal:root=/data/jump:max_samples=100:channels=mito,dna")
    assert (local.root, local.max_samples, local.channels) == ("/data/jump", 100, ("Mito", "DNA"))


@pytest.mark.parametrize("text, message", [
    ("ImageNet:root=/x", "unknown dataset name 'ImageNet'; accepted names: JUMPS3MultiView, JUMPLocal"),
    ("JUMPS3MultiView:bucket=b:root=/x", "unknown key 'root' for JUMPS3MultiView; accepted keys: bucket, prefix"),
    ("JUMPS3MultiView:prefix=p", "JUMPS3MultiView needs bucket=…"),
    ("JUMPS3MultiView:bucket=b:prefix", "malformed part 'prefix'"),
    ("JUMPS3MultiView:bucket=b:max_samples=0", "max_samples must be a positive integer"),
    ("JUMPS3MultiView:bucket=b:channels=DNA,Actin", "unknown channel 'Actin'; accepted channels: Mito, AGP"),
    ("JUMPS3MultiView:bucket=s3://b", "take a bare bucket name and a prefix, not a URL"),
    ("", "empty dataset string"),
])
def test_bad_dataset_strings_say_what_to_change(text, message):
    with pytest.raises(DatasetError) as info:
        parse_dataset(text)
    assert message in info.value.message


def test_config_layers_defaults_file_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("s3:\n  max_concurrency: 8\ndefaults:\n  policy: belady\n")
    config = Config.load(path, ["s3.max_concurrency=16", "log_level=debug"])
    assert config.get("s3.max_concurrency") == 16
    assert config.get("defaults.policy") == "belady"
    assert config.get("s3.read_timeout_s") == 30.0


@pytest.mark.parametrize("override, message", [
    ("s3.max_concurency=4", "unknown config key 's3.max_concurency'; accepted keys here: s3.endpoint_url, s3.region"),
    ("s3=4", "s3 is a section (endpoint_url, region"),
    ("s3.max_concurrency=lots", "s3.max_concurrency must be a number"),
    ("s3.unsigned=maybe", "s3.unsigned must be true or false"),
    ("defaults.policy=fifo", "defaults.policy must be one of lru, belady"),
    ("s3.retries=-1", "s3.retries must be >= 0"),
    ("nonsense", "is not key=value"),
])
def test_bad_config_names_the_key_and_accepted_values(override, message):
    with pytest.raises(ConfigError) as info:
        Config.load(None, [override])
    assert message in info.value.message


def test_daemon_and_trainer_share_one_config_mechanism(tmp_path):
    from prefetchd.config import SCHEMA
    from trainer.config import SCHEMA as TRAINER_SCHEMA

    assert type(SCHEMA) is type(TRAINER_SCHEMA)
    # YAML 1.1 reads 1e1 as text; both read it as the number it is
    assert Config.load(None, ["s3.read_timeout_s=1e1"]).get("s3.read_timeout_s") == 10.0
    bad = tmp_path / "bad.yaml"
    bad.write_text("s3: [unclosed\n")
    with pytest.raises(ConfigError, match=f"config file {bad} is not valid YAML") as info:
        Config.load(bad)
    assert "\n" not in info.value.message  # one line


def test_attach_options_are_validated():
    defaults = Config.load().tree["defaults"]
    opts = resolve_options({"cache_size": 10, "policy": "belady", "clahe": False}, defaults)
    assert (opts.cache_size, opts.policy, opts.preprocessing.clahe) == (10, "belady", None)
    with pytest.raises(ConfigError, match="unknown attach option.*accepted: channels, illum"):
        resolve_options({"cache": 1}, defaults)
    with pytest.raises(ConfigError, match="cache_size must be an integer >= 1"):
        resolve_options({"cache_size": 0}, defaults)
    with pytest.raises(ConfigError, match="policy must be one of lru, belady"):
        resolve_options({"policy": "mru"}, defaults)
