"""Debug console benchmark: server time per API call (the Server-Timing
header, i.e. time spent in the node building the answer) and Chromium's
time to first render, with 10,000 sessions and a 1,000-variable session.

  make bench-console     (or: /usr/bin/python3 bench/console_bench.py [--sessions N] [--vars N] [--runs N])

Prints medians and p95 over --runs calls (after one warm-up call each).
"""
import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'test', 'console'))
import test_console as tc  # noqa: E402  (the node and browser helpers)
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


def server_ms(url):
    t0 = time.perf_counter()
    with urllib.request.urlopen(url, timeout=120) as r:
        body = r.read()
        timing = r.headers['Server-Timing']
    wall = (time.perf_counter() - t0) * 1000
    return float(timing.split('dur=')[1]), wall, len(body)


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * (len(xs) - 1) + 0.5))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--sessions', type=int, default=10000)
    ap.add_argument('--vars', type=int, default=1000)
    ap.add_argument('--runs', type=int, default=20)
    a = ap.parse_args()
    os.makedirs(tc.EBIN, exist_ok=True)
    subprocess.check_call(['erlc', '-o', tc.EBIN, os.path.join(tc.ROOT, 'test/console_node.erl')])
    node = tc.Node().ready()
    profile = tempfile.mkdtemp(prefix='dspex_console_bench_')
    driver = None
    try:
        t0 = time.perf_counter()
        print(node.cmd('seed %d %d' % (a.sessions, a.vars)), '(%.1f s)' % (time.perf_counter() - t0))
        calls = [('overview', '/api/overview'),
                 ('sessions page 1', '/api/sessions?offset=0&limit=50'),
                 ('sessions search', '/api/sessions?q=bench_0099&limit=50'),
                 ('sessions last page', '/api/sessions?offset=%d&limit=50' % (a.sessions - 50)),
                 ('session (%d vars)' % a.vars, '/api/session?id=big'),
                 ('graph.svg (%d vars)' % a.vars, '/api/graph.svg?id=big'),
                 ('session demo', '/api/session?id=demo'),
                 ('timeline (%d vars)' % a.vars, '/api/timeline?id=big&limit=25'),
                 ('state_at middle', '/api/state_at?id=big&seq=%d' % max(2, a.vars // 2)),
                 ('state_at last', '/api/state_at?id=big&seq=%d' % (a.vars + 1)),
                 ('events (all sessions)', '/api/timeline?limit=25'),
                 ('models', '/api/models'),
                 ('optimizations', '/api/optimizations'),
                 ('access (%d sessions)' % a.sessions, '/api/access')]
        print('%-24s %10s %10s %10s %10s' % ('API call', 'server p50', 'server p95', 'wall p50', 'bytes'))
        for name, path in calls:
            server_ms(node.base + path)
            runs = [server_ms(node.base + path) for _ in range(a.runs if 'graph' not in name else max(3, a.runs // 4))]
            s = [r[0] for r in runs]
            w = [r[1] for r in runs]
            print('%-24s %8.2f ms %8.2f ms %8.2f ms %10d' % (name, statistics.median(s), pct(s, 0.95),
                                                             statistics.median(w), runs[-1][2]))
        driver = tc.browser(profile)
        print('%-24s %12s %12s' % ('page (Chromium)', 'FCP p50', 'ready p50'))
        for name, path in [('overview', '/'), ('sessions', '/sessions'), ('session (%d vars)' % a.vars, '/session?id=big'),
                           ('session demo', '/session?id=demo'), ('events', '/events'), ('models', '/models'),
                           ('optimizations', '/optimizations'), ('access', '/access')]:
            fcp, ready = [], []
            for _ in range(5):
                driver.get(node.base + path)
                WebDriverWait(driver, 120, poll_frequency=0.01).until(
                    lambda d: d.find_element(By.ID, 'main').get_attribute('data-ready') == 'true')
                # first contentful paint, and the moment the page's data was on screen
                fcp.append(driver.execute_script(
                    "const e = performance.getEntriesByName('first-contentful-paint')[0]; return e ? e.startTime : null;") or float('nan'))
                ready.append(driver.execute_script("return performance.now();"))
            print('%-24s %9.1f ms %9.1f ms' % (name, statistics.median(fcp), statistics.median(ready)))
        print('(ready = page data rendered, measured at the first poll after it; includes up to 10 ms of polling)')
        # a write on the node until it shows on the open session page (SSE)
        driver.get(node.base + '/session?id=demo')
        WebDriverWait(driver, 120, poll_frequency=0.01).until(
            lambda d: d.find_element(By.ID, 'main').get_attribute('data-ready') == 'true')
        time.sleep(1)   # let the page's event stream connect (a bench, not a test)
        lat = []
        for i in range(10):
            v = '%d.5' % (100 + i)
            t0 = time.perf_counter()
            node.cmd('set demo x ' + v)
            WebDriverWait(driver, 10, poll_frequency=0.002).until(lambda d: d.execute_script(
                "const r = [...document.querySelectorAll('#variables tr')].find(r => r.dataset.name === 'x');"
                " return r && r.querySelector('.value').textContent;") == v)
            lat.append((time.perf_counter() - t0) * 1000)
        print('write -> open page (SSE): p50 %.1f ms, max %.1f ms (includes the command round trip and polling)'
              % (statistics.median(lat), max(lat)))
    finally:
        if driver:
            driver.quit()
        node.stop()
        shutil.rmtree(profile, ignore_errors=True)


if __name__ == '__main__':
    main()
