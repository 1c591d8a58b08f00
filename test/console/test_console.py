"""The debug console in a real browser: headless Chromium driven by Selenium
against bridge nodes started by the test (console on a free port).

Nodes (each an `erl' running test/console_node.erl, seeded with the
session "demo", whose variable names include an XSS attempt):
  rw   loopback, bearer token, console_write => true; region "eu" with one
       peer region "us" whose gateway is a closed loopback port (link down)
  ro   loopback, no token, read-only, no region
  wide bind 0.0.0.0 with a token
  open bind 0.0.0.0 without a token: the console must refuse to start
Screenshots of every page go to _build/console/.
"""
import glob
import json
import os
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
import unittest
import urllib.error
import urllib.request

from selenium import webdriver
from selenium.common.exceptions import NoAlertPresentException, NoSuchElementException, StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.select import Select
from selenium.webdriver.support.ui import WebDriverWait

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..', '..'))
OUT = os.path.join(ROOT, '_build', 'console')
EBIN = os.path.join(OUT, 'ebin')
TOKEN = 'tok-' + os.urandom(6).hex()
XSS = '<img src=x onerror=alert(1)>'
PAGES = ['/', '/sessions', '/session?id=demo', '/session?id=travel', '/optimizations', '/access?id=demo', '/events', '/models', '/regions']
# generous bounds for a loaded 2-core machine; nothing waits for them unless it fails
LOAD_S = 30


def wait(driver, timeout, poll):
    """A bounded wait for a DOM condition; pages re-render parts of themselves
    on every event, so an element found a moment ago may be gone: look again."""
    return WebDriverWait(driver, timeout, poll_frequency=poll,
                         ignored_exceptions=(NoSuchElementException, StaleElementReferenceException))


def closed_port():
    """A loopback port nothing listens on (bound, then released)."""
    s = socket.socket()
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Node:
    def __init__(self, extra=(), **env):
        args = ['erl', '-noshell', '-pa'] + glob.glob(os.path.join(ROOT, '_build/default/lib/*/ebin')) + ['-pa', EBIN]
        base = {'prometheus_enabled': 'false', 'grpc_enabled': 'false', 'console_port': '0',
                'metrics_handlers': 'true'}
        base.update(env)
        for k, v in base.items():
            args += ['-dspex_bridge', k, v]
        args += list(extra) + ['-s', 'console_node', 'main']
        self.proc = subprocess.Popen(args, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True, bufsize=1)
        self.port = None

    def ready(self):
        for line in self.proc.stdout:
            if line.startswith('READY '):
                p = line.split()[1]
                self.port = int(p) if p.isdigit() else p
                return self
        raise RuntimeError('node exited before READY')

    def cmd(self, line):
        self.proc.stdin.write(line + '\n')
        self.proc.stdin.flush()
        for out in self.proc.stdout:
            if out.startswith('OK') or out.startswith('ERR'):
                return out.strip()
        raise RuntimeError('node exited')

    @property
    def base(self):
        return 'http://127.0.0.1:%d' % self.port

    def stop(self):
        try:
            self.proc.stdin.write('quit\n')
            self.proc.stdin.flush()
        except (BrokenPipeError, ValueError):
            pass
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def http(url, method='GET', headers=None, data=None):
    req = urllib.request.Request(url, method=method, headers=headers or {}, data=data)
    try:
        with urllib.request.urlopen(req, timeout=LOAD_S) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def browser(profile):
    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which('chromium') or '/usr/bin/chromium'
    for a in ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
              '--disable-component-update', '--disable-sync', '--no-first-run', '--disable-dev-shm-usage',
              '--window-size=1280,1000', '--user-data-dir=' + profile]:
        opts.add_argument(a)
    opts.set_capability('goog:loggingPrefs', {'browser': 'ALL'})
    d = webdriver.Chrome(service=Service(shutil.which('chromedriver') or '/usr/bin/chromedriver'), options=opts)
    d.set_page_load_timeout(LOAD_S)
    return d


# The Regions page's tables as data: this region's fields, and per peer row
# its data attributes and each classed cell's text.
REGIONS_VIEW = '''
  const f = {};
  document.querySelectorAll('#region tr').forEach((tr) => { f[tr.dataset.field] = tr.querySelector('td').textContent; });
  const peers = Array.from(document.querySelectorAll('#peers tbody tr')).map((tr) => {
    const c = { peer: tr.dataset.peer, 'data-status': tr.dataset.status, text: tr.textContent };
    tr.querySelectorAll('td[class]').forEach((td) => { c[td.className.split(' ')[0]] = td.textContent; });
    return c;
  });
  return { fields: f, peers: peers };'''


class ConsoleTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        os.makedirs(EBIN, exist_ok=True)
        subprocess.check_call(['erlc', '-o', EBIN, os.path.join(ROOT, 'test/console_node.erl')])
        cls.us_port = closed_port()
        cls.rw = Node(extra=['-console_region_peer', str(cls.us_port)], console_token='"%s"' % TOKEN, console_write='true')
        cls.ro = Node()
        # the event log off: the timeline and time travel say so
        cls.wide = Node(console_bind='{0,0,0,0}', console_token='"%s"' % TOKEN, event_log='false')
        cls.closed = Node(console_bind='{0,0,0,0}')
        cls.certdir = tempfile.mkdtemp(prefix='dspex_console_tls_')
        cls.cert = os.path.join(cls.certdir, 'cert.pem')
        key = os.path.join(cls.certdir, 'key.pem')
        subprocess.check_call(['openssl', 'req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-days', '1',
                               '-subj', '/CN=127.0.0.1', '-addext', 'subjectAltName=IP:127.0.0.1',
                               '-keyout', key, '-out', cls.cert], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        cls.tls = Node(console_certfile='"%s"' % cls.cert, console_keyfile='"%s"' % key)
        for n in (cls.rw, cls.ro, cls.wide, cls.closed, cls.tls):
            n.ready()
        cls.profile = tempfile.mkdtemp(prefix='dspex_console_chromium_')
        cls.driver = browser(cls.profile)

    @classmethod
    def tearDownClass(cls):
        cls.driver.quit()
        for n in (cls.rw, cls.ro, cls.wide, cls.closed, cls.tls):
            n.stop()
        shutil.rmtree(cls.profile, ignore_errors=True)
        shutil.rmtree(cls.certdir, ignore_errors=True)

    # -- helpers -------------------------------------------------------------
    def use(self, node, token=None):
        """Opens the node's origin and stores the token as the page's form does."""
        d = self.driver
        d.get(node.base + '/static/style.css')
        d.execute_script("sessionStorage.clear(); if (arguments[0]) sessionStorage.setItem('dspex_token', arguments[0]);", token)
        d.get_log('browser')   # drain

    def open(self, node, path):
        d = self.driver
        d.get(node.base + path)
        wait(d, LOAD_S, 0.05).until(
            lambda d: d.find_element(By.ID, 'main').get_attribute('data-ready') == 'true')
        return d

    def console_errors(self):
        return [e for e in self.driver.get_log('browser') if e['level'] == 'SEVERE']

    def assert_no_alert(self):
        try:
            self.driver.switch_to.alert
        except NoAlertPresentException:
            return
        self.fail('an alert was opened: injected script ran')

    def shot(self, name):
        os.makedirs(OUT, exist_ok=True)
        self.driver.save_screenshot(os.path.join(OUT, name + '.png'))

    def row(self, name):
        for tr in self.driver.find_elements(By.CSS_SELECTOR, '#variables tr'):
            if tr.get_attribute('data-name') == name:
                return tr
        return None

    def watchers(self, node, token):
        st, _, body = http(node.base + '/api/session?id=demo', headers={'Authorization': 'Bearer ' + token})
        self.assertEqual(200, st)
        return json.loads(body)['diagnostics']['watched']

    # -- tests -------------------------------------------------------------------
    def test_every_page_loads_without_console_errors(self):
        self.use(self.rw, TOKEN)
        for path in PAGES:
            with self.subTest(page=path):
                d = self.open(self.rw, path)
                self.assertEqual([], d.find_elements(By.ID, 'error'), path)
                self.assertEqual([], self.console_errors(), path)
                self.assert_no_alert()
                name = path.strip('/').replace('?id=', '_') or 'overview'
                self.shot(name)
        # the parts of other issues are shown as absent, never faked
        _, _, body = http(self.rw.base + '/api/config', headers={'Authorization': 'Bearer ' + TOKEN})
        absent = {p['module'] for p in json.loads(body)['absent']}
        # dspex_region (issue #17's first layer) is in this build: listed as present
        self.assertNotIn('dspex_region', absent)

    def test_regions_page_shows_this_region_and_its_peers(self):
        self.use(self.rw, TOKEN)
        st, _, body = http(self.rw.base + '/api/regions', headers={'Authorization': 'Bearer ' + TOKEN})
        self.assertEqual(200, st)
        api = json.loads(body)
        self.assertEqual((True, 'eu', [50.11, 8.68], 'tcp'), (api['configured'], api['region'], api['coords'], api['transport']))
        d = self.open(self.rw, '/regions')
        # the page re-renders every second: read it in one script, not element by element
        view = lambda d: d.execute_script(REGIONS_VIEW)
        # the link has tried and failed (refreshed every second by the stream)
        v = wait(d, LOAD_S, 0.05).until(lambda d: (lambda v: v if v['peers'] and v['peers'][0].get('last-error') else None)(view(d)))
        fields = v['fields']
        self.assertEqual('eu', fields['region'])
        self.assertEqual('50.1100, 8.6800', fields['coordinates'])
        self.assertEqual('port %d (tcp)' % api['gateway_port'], fields['gateway'])
        self.assertEqual('async_primary_backup', fields['replication mode'])
        # one region of two, its only peer unreachable: no majority, fenced
        self.assertTrue(fields['fenced'].startswith('yes: only eu reachable'), fields['fenced'])
        self.assertEqual('0', fields['sessions (primary here)'])
        self.assertEqual(['us'], [p['peer'] for p in v['peers']])
        us = v['peers'][0]
        self.assertEqual(('down', 'down'), (us['data-status'], us['status']))
        self.assertEqual('{connect,econnrefused}', us['last-error'])
        self.assertRegex(us['since'], r'^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} \(\d+ s ago\)$')
        self.assertEqual(['—', '—', '—', '0', '—', '0', '0', '0'],
                         [us[c] for c in ['p50', 'p99', 'ewma', 'samples', 'checked', 'lag-versions', 'lag-ms', 'sessions']])
        self.assertIn('127.0.0.1:%d' % self.us_port, us['text'])
        self.shot('regions_peers')
        self.assertEqual([], self.console_errors())
        # a node without a region says so
        self.use(self.ro)
        st, _, body = http(self.ro.base + '/api/regions')
        self.assertEqual((200, {'configured': False}), (st, json.loads(body)))
        d = self.open(self.ro, '/regions')
        self.assertIn('Regions not configured', d.find_element(By.ID, 'regions-off').text)
        self.assertEqual([], d.find_elements(By.ID, 'peers'))
        self.assertEqual([], self.console_errors())

    def test_overview_updates_live(self):
        self.use(self.ro)
        d = self.open(self.ro, '/')
        before = int(wait(d, LOAD_S, 0.05).until(lambda d: d.find_element(By.ID, 'ops-hour').text or None))
        for i in range(5):
            self.assertTrue(self.ro.cmd('set demo temperature %d.25' % i).startswith('OK'))
        # the node's store operations reach the open page with the next tick
        wait(d, LOAD_S, 0.05).until(lambda d: int(d.find_element(By.ID, 'ops-hour').text) >= before + 5)
        self.assertTrue(d.find_elements(By.CSS_SELECTOR, '.chart canvas'))
        self.shot('overview_live')
        self.assertEqual([], self.console_errors())

    def test_pages_carry_a_csp_forbidding_inline_scripts(self):
        for path in ['/', '/session', '/static/app.js', '/api/config']:
            st, h, _ = http(self.ro.base + path)
            self.assertEqual(200, st, path)
            csp = {k.lower(): v for k, v in h.items()}['content-security-policy']
            self.assertIn("script-src 'self'", csp)
            self.assertNotIn('unsafe-inline', csp)
        st, _, body = http(self.ro.base + '/')
        self.assertNotRegex(body.decode(), r'<script>(?!</script>)|<script(?![^>]*src=)[^>]*>')

    def test_bad_requests_are_answered_not_crashed(self):
        # a malformed or missing parameter is the request's fault (400); an unknown session is 404
        for path, code in [('/api/session?id=%FF%FE', 400), ('/api/session?id=nope', 404), ('/api/session', 400),
                           ('/api/graph.svg?id=nope', 404), ('/api/history?id=demo&var=nope', 404),
                           ('/api/nothing', 404), ('/static/..%2Fapp.js', 404), ('/static/../index.html', 404),
                           ('/vendor/.hidden', 404), ('/api/sessions?offset=-5&limit=abc', 200)]:
            st, h, body = http(self.ro.base + path)
            self.assertEqual(code, st, path)
        st, _, _ = http(self.ro.base + '/api/overview', 'DELETE')
        self.assertEqual(403, st)
        st, _, _ = http(self.ro.base + '/', 'POST', data=b'x')
        self.assertEqual(405, st)

    def test_session_page_shows_variables_and_graph(self):
        # the read-only node: no test changes x there
        self.use(self.ro)
        d = self.open(self.ro, '/session?id=demo')
        names = sorted(tr.get_attribute('data-name') for tr in d.find_elements(By.CSS_SELECTOR, '#variables tr'))
        self.assertEqual(sorted([XSS, 'temperature', 'x', 'y']), names)
        self.assertEqual('2.0', self.row('x').find_element(By.CSS_SELECTOR, '.value').text)
        wait(d, LOAD_S, 0.05).until(
            lambda d: len(d.find_elements(By.CSS_SELECTOR, '#graph svg g.node')) == 4)
        graph_names = sorted(g.get_attribute('data-name') for g in d.find_elements(By.CSS_SELECTOR, '#graph svg g.node'))
        self.assertEqual(sorted([XSS, 'temperature', 'x', 'y']), graph_names)
        # the derived variable is marked; clicking a node opens that variable
        derived = [g.get_attribute('data-name') for g in d.find_elements(By.CSS_SELECTOR, '#graph svg g.node.derived')]
        self.assertEqual(['y'], derived)
        node = [g for g in d.find_elements(By.CSS_SELECTOR, '#graph svg g.node') if g.get_attribute('data-name') == 'temperature'][0]
        d.execute_script("arguments[0].dispatchEvent(new MouseEvent('click', {bubbles: true}))", node)
        wait(d, LOAD_S, 0.05).until(
            lambda d: d.find_elements(By.ID, 'history-name') and d.find_element(By.ID, 'history-name').text == 'temperature')
        self.shot('session_graph')
        self.assertEqual([], self.console_errors())

    def test_xss_names_render_as_text(self):
        self.use(self.rw, TOKEN)
        d = self.open(self.rw, '/session?id=demo')
        link = [a for a in d.find_elements(By.CSS_SELECTOR, '#variables a.var-link') if a.text == XSS]
        self.assertEqual(1, len(link), 'the name is shown literally')
        self.assertEqual('<b>bold?</b>', self.row(XSS).find_element(By.CSS_SELECTOR, '.value').text)
        self.assertEqual([], d.find_elements(By.CSS_SELECTOR, 'main img, main b, main script'))
        wait(d, LOAD_S, 0.05).until(
            lambda d: len(d.find_elements(By.CSS_SELECTOR, '#graph svg g.node')) == 4)
        self.assertEqual([], d.find_elements(By.CSS_SELECTOR, '#graph img, #graph script'))
        self.assertIn('<script>alert(2)</script>', d.find_element(By.TAG_NAME, 'main').text)
        # the event timeline and time travel name it as text too
        wait(d, LOAD_S, 0.05).until(lambda d: d.find_elements(By.CSS_SELECTOR, '#tt-vars tbody tr'))
        self.assertIn(XSS, [tr.get_attribute('data-name') for tr in d.find_elements(By.CSS_SELECTOR, '#tt-vars tbody tr')])
        self.assertIn(XSS, d.find_element(By.ID, 'timeline-events').text)
        self.assertEqual([], d.find_elements(By.CSS_SELECTOR, 'main img, main b, main script'))
        self.assert_no_alert()
        self.assertEqual([], self.console_errors())

    def test_change_through_the_api_appears_within_one_second(self):
        self.use(self.rw, TOKEN)
        d = self.open(self.rw, '/session?id=demo')
        # the page's event stream is open once its watch is registered (the
        # propagator's watch of x, the input of y, is there from the start)
        wait(d, LOAD_S, 0.05).until(
            lambda _: self.watchers(self.rw, TOKEN).get('temperature', 0) > 0)
        self.assertTrue(self.rw.cmd('set demo x 42.5').startswith('OK'))
        wait(d, 1.0, 0.02).until(
            lambda d: self.row('x').find_element(By.CSS_SELECTOR, '.value').text == '42.5')
        self.assertEqual('test', self.row('x').find_element(By.CSS_SELECTOR, '.changed-by').text)
        # the derived variable follows (propagated, then pushed)
        wait(d, 1.0, 0.02).until(
            lambda d: self.row('y').find_element(By.CSS_SELECTOR, '.value').text == '42.5')
        self.shot('session_live')

    def test_rollback_works_with_console_write(self):
        self.assertTrue(self.rw.cmd('set demo temperature 0.9').startswith('OK'))
        self.use(self.rw, TOKEN)
        d = self.open(self.rw, '/session?id=demo')
        self.row('temperature').find_element(By.CSS_SELECTOR, 'a.var-link').click()
        wait(d, LOAD_S, 0.05).until(
            lambda d: d.find_elements(By.CSS_SELECTOR, '#history tr[data-version="0"] button.rollback'))
        button = d.find_element(By.CSS_SELECTOR, '#history tr[data-version="0"] button.rollback')
        self.assertTrue(button.is_enabled())
        button.click()
        wait(d, LOAD_S, 0.05).until(
            lambda d: d.find_element(By.ID, 'rollback-status').text.startswith('Rolled back'))
        wait(d, LOAD_S, 0.05).until(
            lambda d: self.row('temperature').find_element(By.CSS_SELECTOR, '.value').text == '0.7')
        self.assertEqual('console', self.row('temperature').find_element(By.CSS_SELECTOR, '.changed-by').text)
        self.shot('rollback')
        self.assertEqual([], self.console_errors())

    def test_rollback_is_refused_without_console_write(self):
        self.assertTrue(self.ro.cmd('set demo temperature 0.9').startswith('OK'))
        self.use(self.ro)
        d = self.open(self.ro, '/session?id=demo')
        self.row('temperature').find_element(By.CSS_SELECTOR, 'a.var-link').click()
        wait(d, LOAD_S, 0.05).until(
            lambda d: d.find_elements(By.CSS_SELECTOR, '#history tr[data-version="0"] button.rollback'))
        self.assertFalse(d.find_element(By.CSS_SELECTOR, '#history tr[data-version="0"] button.rollback').is_enabled())
        # the page's own request, sent anyway, is refused by the node
        status = d.execute_async_script("""
            const done = arguments[arguments.length - 1];
            fetch('/api/config').then(r => r.json()).then(c =>
              fetch('/api/rollback', {method: 'POST', headers: {'X-DSPex-CSRF': c.csrf},
                                      body: new URLSearchParams({id: 'demo', var: 'temperature', version: '0'})}))
              .then(r => r.json().then(b => done([r.status, b.error])));""")
        self.assertEqual([403, 'read_only'], status)
        self.assertEqual('0.9', self.row('temperature').find_element(By.CSS_SELECTOR, '.value').text)
        # on the writable node: no CSRF header or no token, no write
        body = b'id=demo&var=temperature&version=0'
        form = {'Content-Type': 'application/x-www-form-urlencoded'}
        st, _, b = http(self.rw.base + '/api/rollback', 'POST', dict(form, Authorization='Bearer ' + TOKEN), body)
        self.assertEqual((403, 'csrf'), (st, json.loads(b)['error']))
        st, _, b = http(self.rw.base + '/api/rollback', 'POST', form, body)
        self.assertEqual(401, st)

    def test_non_loopback_bind_requires_the_token(self):
        self.assertIsInstance(self.wide.port, int)
        st, _, b = http(self.wide.base + '/api/overview')
        self.assertEqual((401, 'unauthorized'), (st, json.loads(b)['error']))
        st, _, _ = http(self.wide.base + '/api/overview', headers={'Authorization': 'Bearer wrong'})
        self.assertEqual(401, st)
        st, _, _ = http(self.wide.base + '/api/overview', headers={'Authorization': 'Bearer ' + TOKEN})
        self.assertEqual(200, st)
        # without any token configured, a non-loopback console does not start
        self.assertEqual('not_running', self.closed.port)

    def test_tls_when_a_certificate_is_configured(self):
        ctx = ssl.create_default_context(cafile=self.cert)
        url = 'https://127.0.0.1:%d' % self.tls.port
        with urllib.request.urlopen(url + '/api/config', timeout=LOAD_S, context=ctx) as r:
            self.assertEqual(200, r.status)
            self.assertIn('write', json.loads(r.read()))
        with urllib.request.urlopen(url + '/', timeout=LOAD_S, context=ctx) as r:
            self.assertIn("script-src 'self'", r.headers['Content-Security-Policy'])
        # plain HTTP is not answered on that port
        with self.assertRaises(Exception):
            urllib.request.urlopen('http://127.0.0.1:%d/api/config' % self.tls.port, timeout=LOAD_S).read()

    def test_token_form_unlocks_the_pages(self):
        self.use(self.wide)
        d = self.open(self.wide, '/sessions')
        self.assertIn('token is required', d.find_element(By.ID, 'error').text)
        d.find_element(By.ID, 'token').send_keys(TOKEN)
        d.find_element(By.CSS_SELECTOR, '#token-form button').click()
        wait(d, LOAD_S, 0.05).until(
            lambda d: d.find_elements(By.ID, 'sessions-info') and 'of 125' in d.find_element(By.ID, 'sessions-info').text)

    def test_access_page_lists_denied_attempts(self):
        self.assertTrue(self.ro.cmd('deny demo x intruder_<i>').startswith('OK'))
        self.use(self.ro)
        d = self.open(self.ro, '/access?id=demo')
        rows = d.find_elements(By.CSS_SELECTOR, '#denied tbody tr')
        self.assertIn(['demo', 'x', 'intruder_<i>', 'read'], [[td.text for td in r.find_elements(By.TAG_NAME, 'td')][1:] for r in rows])
        self.assertGreaterEqual(int(d.find_element(By.ID, 'denied-count').text), 1)
        self.assertEqual([], d.find_elements(By.CSS_SELECTOR, 'main i'))
        self.shot('access_denied')
        self.assertEqual([], self.console_errors())

    def test_optimizations_page_plots_progress_live(self):
        self.assertTrue(self.ro.cmd('optimize demo x 3').startswith('OK'))
        self.use(self.ro)
        d = self.open(self.ro, '/optimizations')
        # the table is redrawn every second: read both cells in one snapshot
        cells = "const r = document.querySelector('#locks tr[data-variable=\"x\"]'); " \
                "return r ? [r.querySelector('.iterations').textContent, r.querySelector('.best').textContent] : null;"
        first = d.execute_script(cells)
        self.assertEqual('3', first[0])
        self.assertIn('"score":0.3', first[1].replace(' ', ''))
        self.assertTrue(self.ro.cmd('progress demo x 0.95').startswith('OK'))
        wait(d, LOAD_S, 0.05).until(lambda d: (d.execute_script(cells) or [''])[0] == '4')
        self.assertIn('"score":0.95', d.execute_script(cells)[1].replace(' ', ''))
        wait(d, LOAD_S, 0.05).until(lambda d: int(d.find_element(
            By.CSS_SELECTOR, '#progress .chart[data-variable="x"]').get_attribute('data-points')) >= 2)
        self.assertTrue(d.find_elements(By.CSS_SELECTOR, '#progress .chart[data-variable="x"] canvas'))
        self.shot('optimizations_live')
        self.assertEqual([], self.console_errors())

    def travel_rows(self):
        """The time-travel table as {name: (then, now, differs)}, read in one snapshot."""
        return self.driver.execute_script("""
            const out = {};
            document.querySelectorAll('#tt-vars tbody tr').forEach((tr) => {
              out[tr.dataset.name] = [tr.querySelector('.then').textContent, tr.querySelector('.now').textContent,
                                      tr.classList.contains('differs')];
            });
            return out;""")

    def test_time_travel_shows_the_old_values(self):
        # "travel": 1 created, 2 a = 1.0, 3 b = 10.0, 4 a = 2.0, 5 b = 20.0, 6 a = 3.0
        self.use(self.ro)
        d = self.open(self.ro, '/session?id=travel')
        slider = wait(d, LOAD_S, 0.05).until(lambda d: d.find_element(By.ID, 'tt-slider'))
        self.assertEqual('6', slider.get_attribute('max'))
        wait(d, LOAD_S, 0.05).until(lambda d: slider.get_attribute('data-loaded') == '6')
        self.assertEqual({'a': ['3.0', '3.0', False], 'b': ['20.0', '20.0', False]}, self.travel_rows())
        # the slider moved back two events (keyboard, as a user does): after event 4
        slider.send_keys(Keys.ARROW_LEFT)
        slider.send_keys(Keys.ARROW_LEFT)
        wait(d, LOAD_S, 0.05).until(lambda d: slider.get_attribute('data-loaded') == '4')
        self.assertEqual({'a': ['2.0', '3.0', True], 'b': ['10.0', '20.0', True]}, self.travel_rows())
        self.assertIn('4 of 6', d.find_element(By.ID, 'tt-seq').text)
        self.shot('session_time_travel')
        # clicking an event of the timeline travels to it: after event 2, b did not exist
        row = [tr for tr in d.find_elements(By.CSS_SELECTOR, '#timeline-events tbody tr')
               if tr.get_attribute('data-sequence') == '2'][0]
        self.assertEqual('variable_registered', row.get_attribute('data-type'))
        row.click()
        wait(d, LOAD_S, 0.05).until(lambda d: slider.get_attribute('data-loaded') == '2')
        self.assertEqual({'a': ['1.0', '3.0', True], 'b': ['(not registered)', '20.0', True]}, self.travel_rows())
        self.assertEqual([], self.console_errors())

    def test_event_timeline_newest_first_filtered_and_paged(self):
        self.use(self.ro)
        d = self.open(self.ro, '/session?id=travel')
        seqs = lambda d: [tr.get_attribute('data-sequence') for tr in d.find_elements(By.CSS_SELECTOR, '#timeline-events tbody tr')]
        wait(d, LOAD_S, 0.05).until(lambda d: seqs(d) == ['6', '5', '4', '3', '2', '1'])
        first = d.find_element(By.CSS_SELECTOR, '#timeline-events tbody tr')
        self.assertEqual(['6', 'variable_updated', 'a', 'carol', '3.0'],
                         [first.find_elements(By.TAG_NAME, 'td')[i].text for i in (0, 2, 3, 4, 6)])
        Select(d.find_element(By.ID, 'timeline-type')).select_by_value('variable_updated')
        wait(d, LOAD_S, 0.05).until(lambda d: seqs(d) == ['6', '5', '4'])
        # pages through the node's whole log on the events page (25 a page)
        st, _, body = http(self.ro.base + '/api/timeline?limit=2&id=travel')
        page = json.loads(body)
        self.assertEqual(([6, 5], True, 6), ([e['sequence'] for e in page['events']], page['more'], page['last_sequence']))
        st, _, body = http(self.ro.base + '/api/timeline?limit=2&id=travel&before=%d' % page['events'][-1]['position'])
        self.assertEqual([4, 3], [e['sequence'] for e in json.loads(body)['events']])
        d = self.open(self.ro, '/events')
        wait(d, LOAD_S, 0.05).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, '#timeline-events tbody tr')) == 25)
        top = d.find_elements(By.CSS_SELECTOR, '#timeline-events tbody tr')[-1].get_attribute('data-position')
        d.find_element(By.ID, 'timeline-older').click()
        wait(d, LOAD_S, 0.05).until(lambda d: int(d.find_elements(By.CSS_SELECTOR, '#timeline-events tbody tr')[0]
                                                  .get_attribute('data-position')) < int(top))
        d.find_element(By.ID, 'timeline-newer').click()
        wait(d, LOAD_S, 0.05).until(lambda d: d.find_elements(By.CSS_SELECTOR, '#timeline-events tbody tr')[-1]
                                    .get_attribute('data-position') == top)
        self.shot('events_paged')
        self.assertEqual([], self.console_errors())

    def test_timeline_and_slider_follow_live_changes(self):
        # the writable node's "travel" (only this test writes it): 6 events, then a live write
        self.use(self.rw, TOKEN)
        d = self.open(self.rw, '/session?id=travel')
        slider = wait(d, LOAD_S, 0.05).until(lambda d: d.find_element(By.ID, 'tt-slider'))
        wait(d, LOAD_S, 0.05).until(lambda d: slider.get_attribute('data-loaded') == '6')
        auth = {'Authorization': 'Bearer ' + TOKEN}
        wait(d, LOAD_S, 0.05).until(lambda _: json.loads(http(self.rw.base + '/api/session?id=travel', headers=auth)[2])
                                    ['diagnostics']['watched'].get('a', 0) > 0)
        self.assertTrue(self.rw.cmd('set travel a 4.5').startswith('OK'))
        # left at the newest event, the slider follows to the new one; the timeline shows it on top
        wait(d, LOAD_S, 0.05).until(lambda d: slider.get_attribute('max') == '7' and slider.get_attribute('data-loaded') == '7')
        self.assertEqual({'a': ['4.5', '4.5', False], 'b': ['20.0', '20.0', False]}, self.travel_rows())
        wait(d, LOAD_S, 0.05).until(lambda d: d.find_element(By.CSS_SELECTOR, '#timeline-events tbody tr').get_attribute('data-sequence') == '7')
        top = d.find_element(By.CSS_SELECTOR, '#timeline-events tbody tr')
        self.assertEqual(['variable_updated', 'a', 'test', '4.5'], [top.find_elements(By.TAG_NAME, 'td')[i].text for i in (2, 3, 4, 6)])
        self.assertEqual([], self.console_errors())

    def test_event_log_off_is_said_not_faked(self):
        self.use(self.wide, TOKEN)
        d = self.open(self.wide, '/session?id=travel')
        wait(d, LOAD_S, 0.05).until(lambda d: 'event log is off' in d.find_element(By.ID, 'timetravel-off').text)
        self.assertIn('event log is off', d.find_element(By.ID, 'timeline-off').text)
        self.assertEqual([], d.find_elements(By.ID, 'tt-slider'))
        d = self.open(self.wide, '/events')
        self.assertIn('event log is off', d.find_element(By.ID, 'timeline-off').text)
        self.assertEqual([], self.console_errors())

    def models_snapshot(self):
        """The models page read in one snapshot (it is redrawn every second)."""
        return self.driver.execute_script("""
            const txt = (e, sel) => { const x = e.querySelector(sel); return x ? x.textContent : null; };
            const all = (e, sel) => Array.from(e.querySelectorAll(sel));
            const section = (sec) => ({
              id: sec.dataset.id, kind: sec.dataset.kind, status: sec.dataset.status,
              fields: Object.fromEntries(all(sec, 'tr[data-field]').map((tr) => [tr.dataset.field, txt(tr, 'td')])),
              traffic: all(sec, '.arms td.traffic').map((td) => td.textContent),
              n: all(sec, '.arms td.n').map((td) => parseInt(td.textContent, 10)),
              comparisons: Object.fromEntries(all(sec, '.comparisons tbody tr').map((tr) =>
                [tr.dataset.model, [txt(tr, '.effect'), txt(tr, '.ci'), txt(tr, '.p')]])),
              gates: Object.fromEntries(all(sec, '.gates tbody tr').map((tr) => [tr.dataset.metric, txt(tr, '.verdict')])),
            });
            return {
              models: all(document, '#models tbody tr').map((tr) => tr.dataset.model),
              metadata: Object.fromEntries(all(document, '#models tbody tr').map((tr) => [tr.dataset.model, txt(tr, '.metadata')])),
              aliases: Object.fromEntries(all(document, '#aliases tbody tr').map((tr) => [tr.dataset.alias, txt(tr, '.target')])),
              running: all(document, '#running section').map(section),
              finished: all(document, '#finished section').map(section),
            };""")

    def test_models_page_shows_registry_experiments_and_rollouts(self):
        self.use(self.ro)
        _, _, body = http(self.ro.base + '/api/models')
        api = {t['name']: t for t in json.loads(body)['tests']}
        d = self.open(self.ro, '/models')
        m = self.models_snapshot()
        self.assertEqual(['old@1', 'old@2', 'ranker@1', 'ranker@2', 'summ@1', 'summ@2'], m['models'])
        self.assertIn('<img src=x onerror=alert(1)>', m['metadata']['ranker@1'])
        self.assertEqual([], d.find_elements(By.CSS_SELECTOR, 'main img'))
        self.assert_no_alert()
        self.assertEqual({'old:production': 'old@1', 'ranker:production': 'ranker@1', 'ranker:staging': 'ranker@2',
                          'summ:production': 'summ@1'}, m['aliases'])
        running = {s['kind']: s for s in m['running']}
        # the running A/B test: 50/50 split, 400 samples over both arms, the
        # sequential test's effect, interval and p-value as the node computes them
        ab = running['ab']
        self.assertEqual(['50.0 %', '50.0 %'], ab['traffic'])
        self.assertEqual(400, sum(ab['n']))
        comp = api['ranker']['comparisons']['ranker@2']
        self.assertEqual(['%.4f' % comp['effect'], '[%.4f, %.4f]' % tuple(comp['ci']), '%.4f' % comp['p_value']],
                         ab['comparisons']['ranker@2'])
        self.assertEqual(api['ranker']['decision'], ab['fields']['decision'])
        # the rollout: step 1 of 3, 10 % on the new model, both gates pending (too few samples)
        ro = running['rollout']
        self.assertEqual('1 of 3', ro['fields']['step'])
        self.assertEqual('10 %', ro['fields']['on the new model'])
        self.assertEqual(['90.0 %', '10.0 %'], ro['traffic'])
        self.assertEqual(400, sum(ro['n']))
        self.assertEqual({'error_rate': 'pending', 'latency': 'pending'}, ro['gates'])
        # the test stopped by hand is listed as finished, with its 25/75 split
        [old] = m['finished']
        self.assertEqual(('ab', 'finished', 'stopped: manual'), (old['kind'], old['status'], old['fields']['decision']))
        self.assertEqual(['25.0 %', '75.0 %'], old['traffic'])
        self.shot('models_seeded')
        self.assertEqual([], self.console_errors())

    def test_optimizations_page_shows_trials_and_convergence(self):
        # the seeded run: TPE maximizing -(lr - 0.3)^2 - 0.01 (depth - 4)^2, 12 trials
        _, _, body = http(self.ro.base + '/api/optimizations')
        [run] = json.loads(body)['runs']
        self.assertEqual((12, 12, 'maximize'), (run['info']['budget'], run['info']['told'], run['info']['direction']))
        expected, best = [], None
        for t in run['trials']:
            if t['state'] == 'complete':
                lr, depth = t['params']['lr'], t['params']['depth']
                # the score told is the objective of the trial's parameters
                self.assertAlmostEqual(-(lr - 0.3) ** 2 - 0.01 * (depth - 4) ** 2, t['score'], places=9)
                best = t['score'] if best is None else max(best, t['score'])
            expected.append(('%d' % t['id'], '%.6f' % t['score'], '%.6f' % best))
        self.assertEqual(best, run['best']['score'])
        self.use(self.ro)
        d = self.open(self.ro, '/optimizations')
        snap = "const s = document.querySelector('#runs section.run'); if (!s) return null; " \
               "const c = s.querySelector('.convergence'); " \
               "return {rows: Array.from(s.querySelectorAll('.trials tbody tr')).map((tr) => " \
               "[tr.dataset.trial, tr.querySelector('.score').textContent, tr.querySelector('.best-so-far').textContent]), " \
               "points: c ? c.dataset.points : null, best: c ? c.dataset.best : null, canvas: !!(c && c.querySelector('canvas')), " \
               "session: s.querySelector('tr[data-field=session] td').textContent};"
        got = wait(d, LOAD_S, 0.05).until(lambda d: d.execute_script(snap))
        self.assertEqual([list(e) for e in expected], got['rows'])
        self.assertEqual(('12', best, True, 'opt'), (got['points'], float(got['best']), got['canvas'], got['session']))
        # best so far never gets worse (maximize)
        bests = [float(r[2]) for r in got['rows']]
        self.assertEqual(sorted(bests), bests)
        self.shot('optimizations_run')
        self.assertEqual([], self.console_errors())

    def test_access_page_shows_rate_limits(self):
        self.use(self.ro)
        d = self.open(self.ro, '/access')
        rows = [[td.text for td in tr.find_elements(By.TAG_NAME, 'td')][:3]
                for tr in d.find_elements(By.CSS_SELECTOR, '#rate-limits tbody tr')]
        self.assertEqual([['limited', '12.500', '40']], rows)
        d = self.open(self.ro, '/access?id=limited')
        self.assertIn('Session limited: 12.500 operations/s, bursts of 40,', d.find_element(By.ID, 'rate-limit').text)
        d = self.open(self.ro, '/access?id=demo')
        self.assertEqual('Session demo: no rate limit.', d.find_element(By.ID, 'rate-limit').text)
        self.shot('access_rate_limits')
        self.assertEqual([], self.console_errors())

    def test_session_page_shows_who_changed_each_variable(self):
        # the current version's changed_by, from the store (not only from live events)
        self.use(self.ro)
        d = self.open(self.ro, '/session?id=travel')
        self.assertEqual({'a': 'carol', 'b': 'bob'},
                         {n: self.row(n).find_element(By.CSS_SELECTOR, '.changed-by').text for n in ('a', 'b')})
        d = self.open(self.ro, '/session?id=demo')
        self.assertEqual('seed', self.row('x').find_element(By.CSS_SELECTOR, '.changed-by').text)

    def test_sessions_search_and_pagination(self):
        self.use(self.ro)
        d = self.open(self.ro, '/sessions')
        wait(d, LOAD_S, 0.05).until(
            lambda d: d.find_element(By.ID, 'sessions-info').text == '1–50 of 125')
        d.find_element(By.ID, 'next').click()
        wait(d, LOAD_S, 0.05).until(
            lambda d: d.find_element(By.ID, 'sessions-info').text == '51–100 of 125')
        d.find_element(By.ID, 'search').send_keys('dem')
        wait(d, LOAD_S, 0.05).until(
            lambda d: d.find_element(By.ID, 'sessions-info').text == '1–1 of 1')
        self.assertEqual(['demo'], [a.text for a in d.find_elements(By.CSS_SELECTOR, '#sessions a')])
        self.assertEqual([], self.console_errors())


if __name__ == '__main__':
    unittest.main()
