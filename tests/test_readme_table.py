"""scripts/readme_table.py: the README's condensed leaderboard keeps the options that differ from the defaults."""
from conftest import load_script


def test_short_specs_drop_defaults_but_never_the_knob():
    short = load_script("readme_table").short_spec
    assert short("fora:interval=2,warmup=0,unit=attn1+ff,attn1_interval=0,ff_interval=0") == "fora:interval=2"
    assert short("fora:interval=2,warmup=0,unit=attn1+ff,attn1_interval=8,ff_interval=4") == \
        "fora:attn1_interval=8,ff_interval=4"
    assert short("learned:path=out/run/train/mlp,threshold=0.002933122166304472,per_sample=False,max_reuse=3") == \
        "learned:path=mlp,threshold=0.00293,max_reuse=3"
    assert short("baseline") == "plain model"
