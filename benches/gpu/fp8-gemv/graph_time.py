# The timing both GEMV benches use: a layer function f(l) run for every layer once (warm-up),
# then captured as one CUDA graph on a stream of its own and replayed `reps` times; the mean
# microseconds a layer.
import cupy as cp

_stream = cp.cuda.Stream(non_blocking=True)


def us_per_layer(f, layers, reps=20):
    with _stream:
        for l in range(layers): f(l)
        _stream.synchronize()
        _stream.begin_capture()
        for l in range(layers): f(l)
        g = _stream.end_capture()
        g.launch(_stream); _stream.synchronize()
        a, b = cp.cuda.Event(), cp.cuda.Event()
        a.record(_stream)
        for _ in range(reps): g.launch(_stream)
        b.record(_stream); b.synchronize()
    return cp.cuda.get_elapsed_time(a, b) * 1000 / reps / layers
