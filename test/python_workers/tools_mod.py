"""Functions a worker pool exposes as tools in the tool-bridge tests."""


def add(a, b):
    return a + b


def count(n, label="item"):
    """Yields n items, one at a time (a streaming tool)."""
    for i in range(n):
        yield {"i": i, "label": label}


def count_then_fail(n):
    for i in range(n):
        yield i
    raise RuntimeError("stream broke after %d" % n)


def boom():
    raise ValueError("tool exploded")


def sleep(seconds):
    """Sleeps, then answers (a tool that outlives a short deadline)."""
    import time
    time.sleep(seconds)
    return seconds


def size(s):
    """The length of its argument (requests of any size)."""
    return len(s)


def big(n):
    """A result of n characters (replies of any size)."""
    return "x" * n


def big_chunks(n):
    """A small chunk, then one of n characters."""
    yield "small"
    yield "x" * n


FUNCTIONS = {"add": add, "count": count, "count_then_fail": count_then_fail, "boom": boom, "sleep": sleep,
             "size": size, "big": big, "big_chunks": big_chunks}
