import signal, os, pytest
from pyro_vae.rundir import signals_held

def test_a_signal_inside_the_block_arrives_after_it():
    seen = []
    old = signal.signal(signal.SIGTERM, lambda n, f: seen.append(("handler", n)))
    try:
        with signals_held():
            os.kill(os.getpid(), signal.SIGTERM)
            seen.append("block end")
        assert seen == ["block end", ("handler", signal.SIGTERM)]
    finally:
        signal.signal(signal.SIGTERM, old)

def test_ctrl_c_inside_the_block_raises_after_it():
    done = []
    with pytest.raises(KeyboardInterrupt):
        with signals_held():
            os.kill(os.getpid(), signal.SIGINT)
            done.append(1)
    assert done == [1] and signal.getsignal(signal.SIGINT) is signal.default_int_handler
