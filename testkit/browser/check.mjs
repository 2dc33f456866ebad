#!/usr/bin/env node
// Quarry's headless-browser checker: opens pages in Debian's Chromium (driven by playwright-core),
// fails on console errors, uncaught exceptions and failed requests, checks counts and texts that
// an expect file names, and saves a full-page screenshot of each page. See README.md beside it.
//
//   node check.mjs --url URL --expect FILE.json --screenshot OUT.png [--url URL2 ...] [options]
//
// Exit status: 0 when every check passed, 1 when one failed, 2 for a usage or setup error.

import { mkdir, readFile } from 'node:fs/promises';
import { accessSync, constants } from 'node:fs';
import path from 'node:path';
import process from 'node:process';

const USAGE = `usage: node check.mjs --url URL --expect FILE.json --screenshot OUT.png [--url URL2 --expect F2 --screenshot O2 ...]
                      [--chromium PATH] [--timeout SECONDS] [--wait-until networkidle|load|domcontentloaded]

Each --url starts a page; the --expect and --screenshot after it belong to that page.
  --expect FILE.json   {"counts": {"<key>": <integer>, ...}, "texts": ["substring", ...],
                        "order": ["first", "second", ...], "search": {"query": "text", "finds": "text"}}
                       counts: the first [data-count="<key>"] element's text, read as an integer
                       texts:  each must appear in document.body.innerText
                       order:  texts that must appear in document.body.innerText in this order
                       search: type query into #q, press Enter; #found must come to show finds
  --screenshot OUT.png full-page screenshot, parent directories created
  --chromium PATH      the browser (default: $QUARRY_CHROMIUM, else /usr/bin/chromium)
  --timeout SECONDS    time allowed for each page, from opening to screenshot (default 30)
  --wait-until EVENT   when a page counts as loaded (default networkidle; use load for pages that
                       keep a connection open, such as a live view's event stream)`;

// Chromium's flags for this machine: headless as root, and no traffic of its own (the network is
// closed apart from loopback). Playwright adds --headless and --no-sandbox itself (chromiumSandbox
// is off by default), and a fresh temporary --user-data-dir that it removes when the browser closes.
const CHROMIUM_ARGS = [
    '--no-sandbox',
    '--disable-gpu',
    '--disable-quic',
    '--no-first-run',
    '--disable-background-networking',
    '--disable-component-update',
    '--disable-sync',
    '--disable-dev-shm-usage',
];

class UsageError extends Error {}

function parseArgs(argv) {
    const options = {
        chromium: process.env.QUARRY_CHROMIUM || '/usr/bin/chromium',
        timeoutMs: 30_000,
        waitUntil: 'networkidle',
        pages: [],
    };
    const perPage = new Set(['--expect', '--screenshot']);
    for (let i = 0; i < argv.length; i++) {
        let flag = argv[i];
        let value;
        const eq = flag.indexOf('=');
        if (flag.startsWith('--') && eq > 0) {
            value = flag.slice(eq + 1);
            flag = flag.slice(0, eq);
        }
        if (flag === '--help' || flag === '-h') {
            console.log(USAGE);
            process.exit(0);
        }
        const known = ['--url', '--expect', '--screenshot', '--chromium', '--timeout', '--wait-until'];
        if (!known.includes(flag)) throw new UsageError(`unknown argument: ${argv[i]}`);
        if (value === undefined) {
            if (i + 1 >= argv.length) throw new UsageError(`${flag} needs a value`);
            value = argv[++i];
        }
        if (flag === '--url') {
            options.pages.push({ url: value, expect: null, screenshot: null });
        } else if (perPage.has(flag)) {
            const page = options.pages.at(-1);
            if (!page) throw new UsageError(`${flag} must follow the --url it belongs to`);
            const key = flag.slice(2);
            if (page[key] !== null) throw new UsageError(`${flag} given twice for ${page.url}`);
            page[key] = value;
        } else if (flag === '--chromium') {
            options.chromium = value;
        } else if (flag === '--timeout') {
            const seconds = Number(value);
            if (!(seconds > 0)) throw new UsageError(`--timeout wants a positive number of seconds, not ${value}`);
            options.timeoutMs = seconds * 1000;
        } else if (flag === '--wait-until') {
            if (!['networkidle', 'load', 'domcontentloaded'].includes(value)) {
                throw new UsageError(`--wait-until wants networkidle, load or domcontentloaded, not ${value}`);
            }
            options.waitUntil = value;
        }
    }
    if (options.pages.length === 0) throw new UsageError('no --url given');
    for (const page of options.pages) {
        if (page.expect === null) throw new UsageError(`no --expect for ${page.url}`);
        if (page.screenshot === null) throw new UsageError(`no --screenshot for ${page.url}`);
    }
    return options;
}

async function readExpect(file) {
    let expect;
    try {
        expect = JSON.parse(await readFile(file, 'utf8'));
    } catch (err) {
        throw new UsageError(`cannot read the expect file ${file}: ${err.message}`);
    }
    const bad = (why) => new UsageError(`expect file ${file}: ${why}`);
    if (expect === null || typeof expect !== 'object' || Array.isArray(expect)) throw bad('not a JSON object');
    for (const key of Object.keys(expect)) {
        if (!['counts', 'texts', 'order', 'search'].includes(key)) {
            throw bad(`unknown key "${key}" (only "counts", "texts", "order" and "search")`);
        }
    }
    const counts = expect.counts ?? {};
    if (counts === null || typeof counts !== 'object' || Array.isArray(counts)) throw bad('"counts" is not an object');
    for (const [key, n] of Object.entries(counts)) {
        if (!Number.isSafeInteger(n)) throw bad(`count "${key}" is not an integer: ${JSON.stringify(n)}`);
    }
    const texts = expect.texts ?? [];
    if (!Array.isArray(texts) || texts.some((t) => typeof t !== 'string' || t === '')) {
        throw bad('"texts" is not an array of non-empty strings');
    }
    const order = expect.order ?? [];
    if (!Array.isArray(order) || order.some((t) => typeof t !== 'string' || t === '')) {
        throw bad('"order" is not an array of non-empty strings');
    }
    const search = expect.search ?? null;
    if (search !== null && (typeof search.query !== 'string' || typeof search.finds !== 'string')) {
        throw bad('"search" wants {"query": string, "finds": string}');
    }
    return { counts, texts, order, search };
}

// "1,234", "1 234" (narrow or plain no-break space), "1'234" or "1_234" -> 1234; anything that is
// not an integer once those separators are gone -> null.
function parseCount(text) {
    const digits = text.trim().replace(/[,'_\s\u00a0\u2009\u202f]/g, '');
    return /^[-+]?\d+$/.test(digits) ? Number.parseInt(digits, 10) : null;
}

function isFaviconProbe(text, at, pageUrl) {
    if (!at || !text.startsWith('Failed to load resource')) return false;
    try {
        return at === new URL('/favicon.ico', pageUrl).href;
    } catch {
        return false;
    }
}

const squash = (s) => s.replace(/\s+/g, ' ').trim();
const show = (s, max = 160) => {
    const one = JSON.stringify(s);
    return one.length > max ? `${one.slice(0, max - 1)}…"` : one;
};

class Reporter {
    constructor() {
        this.passed = 0;
        this.failed = 0;
    }
    ok(what) {
        this.passed++;
        console.log(`ok   ${what}`);
    }
    fail(what) {
        this.failed++;
        console.log(`FAIL ${what}`);
    }
    check(good, what) {
        if (good) this.ok(what);
        else this.fail(what);
    }
}

// Runs fn(phase) but gives up after ms, naming the phase it was in. `phase.now` is updated by fn.
async function withDeadline(ms, fn) {
    const phase = { now: 'starting' };
    let timer;
    const deadline = new Promise((_, reject) => {
        timer = setTimeout(
            () => reject(new Error(`timed out after ${ms / 1000} s while ${phase.now}`)),
            ms,
        );
    });
    const work = fn(phase);
    work.catch(() => {}); // after a timeout, its late rejection is not an unhandled one
    try {
        return await Promise.race([work, deadline]);
    } finally {
        clearTimeout(timer);
    }
}

async function checkPage(browser, spec, options, report) {
    const label = spec.url;
    const expect = await readExpect(spec.expect);
    const problems = [];
    const ignored = [];
    let collecting = true;
    const note = (problem) => {
        if (collecting) problems.push(problem);
    };

    const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
    try {
        const page = await context.newPage();
        page.setDefaultTimeout(options.timeoutMs);
        page.setDefaultNavigationTimeout(options.timeoutMs);
        page.on('console', (msg) => {
            if (msg.type() !== 'error') return;
            const at = msg.location();
            // Chromium asks the page's origin for /favicon.ico by itself when the page links no
            // icon; that request is the browser's, not the page's, and Playwright does not see it
            // as a request: only this console line tells of its 404. Said, but not held against it.
            if (isFaviconProbe(msg.text(), at && at.url, page.url())) {
                ignored.push(`the browser's own ${at.url} probe (${msg.text()})`);
                return;
            }
            const where = at && at.url ? ` (${at.url}:${at.lineNumber + 1})` : '';
            note(`console error: ${msg.text()}${where}`);
        });
        page.on('pageerror', (err) => {
            note(`uncaught exception: ${err.name ? `${err.name}: ` : ''}${err.message}`);
        });
        page.on('requestfailed', (req) => {
            const why = req.failure()?.errorText ?? 'failed';
            note(`request failed: ${req.method()} ${req.url()} (${why})`);
        });
        page.on('response', (resp) => {
            if (resp.status() >= 400) {
                note(`HTTP ${resp.status()} ${resp.statusText()}: ${resp.request().method()} ${resp.url()}`);
            }
        });

        try {
            await withDeadline(options.timeoutMs, async (phase) => {
                phase.now = `loading the page (waiting for ${options.waitUntil})`;
                const started = Date.now();
                const response = await page.goto(spec.url, { waitUntil: options.waitUntil });
                const status = response ? response.status() : 'no response';
                report.check(
                    response !== null && response.status() < 400,
                    `${label} loaded (${status}) in ${((Date.now() - started) / 1000).toFixed(1)} s`,
                );

                phase.now = 'reading the page';
                const found = await page.evaluate((keys) => {
                    const out = {};
                    for (const key of keys) {
                        const els = document.querySelectorAll(`[data-count="${CSS.escape(key)}"]`);
                        out[key] = { n: els.length, text: els.length ? els[0].textContent : null };
                    }
                    return { counts: out, text: document.body ? document.body.innerText : '' };
                }, Object.keys(expect.counts));

                for (const [key, want] of Object.entries(expect.counts)) {
                    const { n, text } = found.counts[key];
                    if (n === 0) {
                        report.fail(`${label} count ${key}: no [data-count="${key}"] element`);
                        continue;
                    }
                    const got = parseCount(text);
                    const more = n > 1 ? ` (first of ${n})` : '';
                    if (got === null) {
                        report.fail(`${label} count ${key}: expected ${want}, text ${show(text.trim())} is not an integer${more}`);
                    } else {
                        report.check(
                            got === want,
                            got === want
                                ? `${label} count ${key} = ${want}${more}`
                                : `${label} count ${key}: expected ${want}, found ${got} (${show(text.trim())})${more}`,
                        );
                    }
                }

                const squashed = squash(found.text);
                for (const want of expect.texts) {
                    const present = found.text.includes(want) || squashed.includes(squash(want));
                    report.check(present, `${label} text ${show(want)}${present ? '' : ' not found in the page'}`);
                }

                if (expect.order.length > 0) {
                    // Each text after the one before it, in the page as a person reads it.
                    let at = 0;
                    let missing = null;
                    for (const want of expect.order) {
                        const found = squashed.indexOf(squash(want), at);
                        if (found < 0) {
                            missing = want;
                            break;
                        }
                        at = found + squash(want).length;
                    }
                    report.check(
                        missing === null,
                        missing === null
                            ? `${label} order ${expect.order.map((t) => show(t, 40)).join(' < ')}`
                            : `${label} order: ${show(missing)} not found after the texts before it`,
                    );
                }

                if (expect.search) {
                    const { query, finds } = expect.search;
                    phase.now = `searching for ${show(query)}`;
                    await page.fill('#q', query);
                    await page.press('#q', 'Enter');
                    const shown = await page
                        .waitForFunction(
                            (want) => (document.getElementById('found')?.innerText ?? '').includes(want),
                            finds,
                            { timeout: options.timeoutMs },
                        )
                        .then(() => true, () => false);
                    report.check(shown, `${label} search ${show(query)} ${shown ? 'finds' : 'does not find'} ${show(finds)}`);
                }

                phase.now = `saving the screenshot ${spec.screenshot}`;
                await mkdir(path.dirname(path.resolve(spec.screenshot)), { recursive: true });
                await page.screenshot({ path: spec.screenshot, fullPage: true, timeout: options.timeoutMs });
                const size = await page.evaluate(() => [
                    document.documentElement.scrollWidth,
                    document.documentElement.scrollHeight,
                ]);
                report.ok(`${label} screenshot ${spec.screenshot} (${size[0]}x${size[1]})`);
            });
        } catch (err) {
            report.fail(`${label}: ${err.message.split('\n')[0]}`);
        }

        // What happened up to here counts; requests cut off by closing the page do not.
        collecting = false;
        if (problems.length === 0) {
            const aside = ignored.length ? ` (ignored: ${ignored.join('; ')})` : '';
            report.ok(`${label} no console errors, uncaught exceptions or failed requests${aside}`);
        } else {
            for (const problem of problems) report.fail(`${label} ${problem}`);
        }
    } finally {
        await context.close().catch(() => {});
    }
}

async function main() {
    let options;
    try {
        options = parseArgs(process.argv.slice(2));
        for (const page of options.pages) await readExpect(page.expect);
    } catch (err) {
        if (!(err instanceof UsageError)) throw err;
        console.error(`check.mjs: ${err.message}\n\n${USAGE}`);
        return 2;
    }
    try {
        accessSync(options.chromium, constants.X_OK);
    } catch {
        console.error(
            `check.mjs: no Chromium at ${options.chromium}: run deploy/local/up (it installs Debian's chromium), ` +
                'or pass --chromium PATH / set QUARRY_CHROMIUM',
        );
        return 2;
    }
    let chromium;
    try {
        ({ chromium } = await import('playwright-core'));
    } catch (err) {
        console.error(
            `check.mjs: cannot load playwright-core (${err.message.split('\n')[0]}): ` +
                'run deploy/local/up, or `npm ci` in testkit/browser',
        );
        return 2;
    }

    const report = new Reporter();
    let browser;
    try {
        browser = await chromium.launch({
            executablePath: options.chromium,
            headless: true,
            args: CHROMIUM_ARGS,
            timeout: options.timeoutMs,
        });
    } catch (err) {
        report.fail(`launching ${options.chromium}: ${err.message.split('\n')[0]}`);
        console.log(`summary: ${report.passed} ok, ${report.failed} failed`);
        return 1;
    }
    const version = browser.version();
    try {
        for (const spec of options.pages) {
            await checkPage(browser, spec, options, report);
        }
    } finally {
        await browser.close().catch(() => {});
    }
    console.log(`summary: ${report.passed} ok, ${report.failed} failed (${options.pages.length} page${options.pages.length === 1 ? '' : 's'}, Chromium ${version})`);
    return report.failed === 0 ? 0 : 1;
}

main().then(
    (code) => process.exit(code),
    (err) => {
        console.error(`check.mjs: ${err.stack || err}`);
        process.exit(2);
    },
);
