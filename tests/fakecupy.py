"""A stand-in for CuPy on a machine without a GPU: NumPy's arithmetic under
CuPy's rules, so that llm.py's GPU path (`use_device("cuda")`) runs here.

What it checks is the discipline that a real GPU would enforce and a CPU run
never does, the bugs that would otherwise first show on the GPU:
- an array never converts to NumPy by itself (`numpy.asarray(a)`, a NumPy
  function or operator given a device array and a host array): TypeError, as
  in CuPy; arrays come back to the host only through `.get()` / `asnumpy`;
- host arrays go to the device only through `asarray` / `array` (CuPy's other
  functions reject them; here indices and assigned values must be device
  arrays too, which is stricter than CuPy and costs nothing there);
- reductions and scalar indexing give 0-d arrays, not Python numbers, and
  `round()` / `range()` of one fail, as with CuPy.
It also counts the copies each way (`transfers`), so a test can check that
a training step copies its batch in and a few scalars out, however deep the
model. `a.data.ptr` is the host address of the data, so fastops' CUDA kernels
compiled for the CPU (helpers.build_fastops) can run on these arrays, as
test_cuda.py does. What it cannot check: the GPU itself (speed, memory, its
memory model) and CuPy's own numerical differences.
"""
import sys
import types

import numpy

transfers = {"to_device": 0, "to_host": 0}      # copies between host and "device", counted

_MSG = ("Implicit conversion to a NumPy array is not allowed. "
        "Please use `.get()` to construct a NumPy array explicitly.")


def _dev(x):
    """Device arrays -> their NumPy data; host arrays -> TypeError."""
    if isinstance(x, ndarray):
        return x._a
    if isinstance(x, numpy.ndarray):
        raise TypeError(f"Unsupported type {type(x)} (a host array where a device array is needed)")
    if isinstance(x, (tuple, list)):
        return type(x)(_dev(e) for e in x)
    if isinstance(x, dict):
        return {k: _dev(v) for k, v in x.items()}
    return x


def _wrap(r):
    if isinstance(r, numpy.ndarray):
        return ndarray(r)
    if isinstance(r, numpy.generic):
        return ndarray(numpy.asarray(r))              # CuPy's reductions: 0-d arrays
    if isinstance(r, tuple):
        return tuple(_wrap(e) for e in r)
    if isinstance(r, list):
        return [_wrap(e) for e in r]
    return r


class ndarray(numpy.lib.mixins.NDArrayOperatorsMixin):
    """An array 'on the device': a NumPy array nobody outside may touch."""
    __slots__ = ("_a",)

    def __init__(self, a):
        self._a = a

    def __array__(self, *args, **kwargs):
        raise TypeError(_MSG)

    def __array_ufunc__(self, ufunc, method, *inputs, out=None, **kwargs):
        kwargs = _dev(kwargs)
        if out is not None:
            kwargs["out"] = _dev(out)
        r = getattr(ufunc, method)(*_dev(inputs), **kwargs)
        if out is not None:                           # in place: the same objects back
            return out[0] if len(out) == 1 else out
        return _wrap(r)

    def __array_function__(self, func, types_, args, kwargs):
        return _wrap(func(*_dev(args), **_dev(kwargs)))

    def __getattr__(self, name):                      # shape, dtype, T, reshape, sum, ...
        if name.startswith("__"):                     # __array_interface__ & co.: no way out
            raise AttributeError(name)
        if name in ("item", "tolist"):
            transfers["to_host"] += 1
        attr = getattr(self._a, name)
        if callable(attr):
            return lambda *a, **k: _wrap(attr(*_dev(a), **_dev(k)))
        return _wrap(attr)

    def __getitem__(self, key):
        return _wrap(self._a[_dev(key)])

    def __setitem__(self, key, value):
        self._a[_dev(key)] = _dev(value)

    def __len__(self):
        return len(self._a)

    def __iter__(self):
        return (_wrap(r) for r in self._a)

    def __float__(self):
        transfers["to_host"] += 1
        return float(self._a)

    def __int__(self):
        transfers["to_host"] += 1
        return int(self._a)

    def __bool__(self):
        transfers["to_host"] += 1
        return bool(self._a)

    def __format__(self, spec):
        transfers["to_host"] += 1
        return format(self._a.item() if self._a.ndim == 0 else self._a, spec)

    def __repr__(self):
        return "device:" + repr(self._a)

    def __deepcopy__(self, memo):                     # a copy on the device, as CuPy's
        return ndarray(self._a.copy())

    @property
    def data(self):                                   # CuPy's memory pointer: here, host memory
        return types.SimpleNamespace(ptr=self._a.ctypes.data)

    def get(self):
        transfers["to_host"] += 1
        return self._a.copy()


def asarray(a, dtype=None, order=None):
    if isinstance(a, ndarray):
        return a if dtype is None or a.dtype == dtype else a.astype(dtype)
    transfers["to_device"] += 1
    return ndarray(numpy.array(a, dtype=dtype, order=order))   # the host-to-device copy


def array(a, dtype=None, copy=True, order="K"):
    transfers["to_device"] += not isinstance(a, ndarray)
    return ndarray(numpy.array(a._a if isinstance(a, ndarray) else a, dtype=dtype, order=order))


def asnumpy(a):
    return a.get() if isinstance(a, ndarray) else numpy.asarray(a)


class _UFunc:
    """numpy.exp & co.: device arrays in, device arrays out (and .at, .reduce, ...)."""

    def __init__(self, f):
        self._f = f

    def __call__(self, *args, **kwargs):
        return _wrap(self._f(*_dev(args), **_dev(kwargs)))

    def __getattr__(self, name):
        attr = getattr(self._f, name)
        return (lambda *a, **k: _wrap(attr(*_dev(a), **_dev(k)))) if callable(attr) else attr


def __getattr__(name):
    """Every other name: NumPy's, with device arrays in and out."""
    obj = getattr(numpy, name)
    if isinstance(obj, (type, numpy.dtype)) or not callable(obj):
        return obj                                    # dtypes, constants (float32, inf)
    return _UFunc(obj)


def get_default_memory_pool():
    return types.SimpleNamespace(free_all_blocks=lambda: None, used_bytes=lambda: 0)


cuda = types.SimpleNamespace(
    runtime=types.SimpleNamespace(getDeviceCount=lambda: 1,
                                  getDeviceProperties=lambda i: {"name": b"fakecupy (the CPU)"}),
    Device=lambda i=0: types.SimpleNamespace(synchronize=lambda: None))

# cupyx, CuPy's extras: the one llm.py uses
cupyx = types.ModuleType("cupyx")
cupyx.scatter_add = lambda a, index, values: numpy.add.at(a._a, _dev(index), _dev(values))


def install(monkeypatch):
    """`import cupy` (and cupyx) gives this module, for one test."""
    monkeypatch.setitem(sys.modules, "cupy", sys.modules[__name__])
    monkeypatch.setitem(sys.modules, "cupyx", cupyx)
