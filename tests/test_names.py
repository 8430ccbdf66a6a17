"""Short method names (tables, plots, grid titles): the spec minus its defaults, never minus the knob."""
from cqpolicy.tracking.names import short_name


def test_short_names_drop_defaults_but_never_the_knob():
    assert short_name("fora:interval=2,warmup=0,unit=attn1+ff,attn1_interval=0,ff_interval=0") == "fora:interval=2"
    assert short_name("fora:interval=2,warmup=0,unit=attn1+ff,attn1_interval=8,ff_interval=4") == \
        "fora:attn1_interval=8,ff_interval=4"
    assert short_name("learned:path=out/run/train/mlp,threshold=0.002933122166304472,per_sample=False,max_reuse=3") \
        == "learned:path=mlp,threshold=0.00293,max_reuse=3"
    assert short_name("baseline") == "plain model"


def test_units_a_model_family_takes_by_default_are_dropped_others_kept():
    assert short_name("fora:interval=3,unit=layer") == "fora:interval=3"  # the UNet's default units
    assert short_name("fora:interval=3,unit=block") == "fora:interval=3,unit=block"
    assert short_name("teacache:threshold=0.3,max_reuse=4,warmup=1,unit=block") == "teacache:threshold=0.3"
    assert short_name("teacache:threshold=0.3,unit=attn1+ff") == "teacache:threshold=0.3,unit=attn1+ff"
    assert short_name("taylorseer:interval=4,order=1,warmup=1,units=attn1+ff") == "taylorseer:interval=4"
    assert short_name("not-a-family:x=1") == "not-a-family:x=1"
