/**
 * What the panel shows, computed from the server's descriptions: pure functions without
 * JupyterLab imports, so the unit tests (jest, `jlpm test`) run them as they are.
 */
import type { TranslationBundle } from '@jupyterlab/translation';

import { IEnvironment } from './request';

/** One row's state, as its short label and the summary line count it. */
export type State =
  | 'problem'
  | 'failed'
  | 'staging'
  | 'evicting'
  | 'starting'
  | 'ready'
  | 'not-staged';

/** What a row waits for the server to do. */
export type Action = 'stage' | 'evict' | 'open' | 'shutdown';

/** Sizes in decimal units, like the `kernelprov` CLI and its error messages. */
export function formatBytes(bytes: number | null | undefined): string {
  if (bytes === null || bytes === undefined) {
    return '—';
  }
  const units = ['B', 'kB', 'MB', 'GB', 'TB'];
  let value = bytes;
  let unit = 0;
  while (value >= 1000 && unit < units.length - 1) {
    value /= 1000;
    unit += 1;
  }
  const digits = value >= 100 || unit === 0 ? 0 : 1;
  return `${value.toFixed(digits)} ${units[unit]}`;
}

/** "8 s", "2 min 5 s", "1 h 3 min": elapsed and remaining times in the progress line. */
export function formatDuration(seconds: number): string {
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) {
    return `${s} s`;
  }
  if (s < 3600) {
    const rest = s % 60;
    return rest ? `${Math.floor(s / 60)} min ${rest} s` : `${s / 60} min`;
  }
  return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
}

/**
 * Seconds left at a steady rate, or null while too little is known (under 3 % or 2 s in).
 */
export function remainingSeconds(
  fraction: number | null | undefined,
  elapsed: number | null | undefined
): number | null {
  if (!fraction || !elapsed || fraction < 0.03 || elapsed < 2) {
    return null;
  }
  return Math.max(0, (elapsed * (1 - fraction)) / fraction);
}

/** The state of one row; `busy` is what the row waits for the server to do. */
export function stateOf(env: IEnvironment, busy?: Action): State {
  if (env.staged && busy === 'evict') {
    return 'evicting';
  }
  if (busy === 'open') {
    return 'starting';
  }
  if (env.staged) {
    return 'ready';
  }
  if (env.staging && !env.staging.error) {
    return 'staging';
  }
  if (env.problems.length) {
    return 'problem';
  }
  if (env.staging?.error || env.last_failure) {
    return 'failed';
  }
  return 'not-staged';
}

/** Whether a row needs the researcher's attention (and sorts first). */
export function hasProblem(env: IEnvironment): boolean {
  const state = stateOf(env);
  return state === 'problem' || state === 'failed';
}

/** Problem rows first, then by display name (as the server sorts; kept when rows merge). */
export function sortEnvironments(envs: IEnvironment[]): IEnvironment[] {
  return [...envs].sort((a, b) => {
    const problem = Number(hasProblem(b)) - Number(hasProblem(a));
    if (problem) {
      return problem;
    }
    const byName = a.display_name.localeCompare(b.display_name, undefined, {
      sensitivity: 'base'
    });
    return byName || a.name.localeCompare(b.name);
  });
}

/** The one sentence that explains a problem or failed row (the first that applies). */
export function problemText(env: IEnvironment): string | null {
  if (env.problems.length) {
    return env.problems[0];
  }
  if (env.staging?.error) {
    return env.staging.error;
  }
  if (env.last_failure && !env.staged) {
    return env.last_failure.message;
  }
  return null;
}

/** Counts for the summary line, in the order it lists them. */
export function summarize(
  envs: ReadonlyArray<IEnvironment>
): Array<[State | 'in-use', number]> {
  const counts = new Map<State | 'in-use', number>();
  for (const env of envs) {
    let state: State | 'in-use' = stateOf(env);
    if (state === 'failed') {
      state = 'problem';
    }
    if (state === 'ready' && env.staged?.in_use) {
      state = 'in-use';
    }
    counts.set(state, (counts.get(state) ?? 0) + 1);
  }
  const order: Array<State | 'in-use'> = [
    'in-use',
    'ready',
    'staging',
    'problem',
    'not-staged'
  ];
  return order
    .filter(state => counts.get(state))
    .map(state => [state, counts.get(state) as number]);
}

/** Packages in an env: conda records and pip-installed distributions, when known. */
export function packageCount(env: IEnvironment): number | null {
  if (env.packages === null && env.pip_packages === null) {
    return null;
  }
  return (env.packages ?? 0) + (env.pip_packages ?? 0);
}

/** The environments whose staging the fast poll follows. */
export function stagingNames(envs: ReadonlyArray<IEnvironment>): string[] {
  return envs
    .filter(env => env.staging && !env.staging.error && !env.staged)
    .map(env => env.name);
}

/**
 * The parts of a progress line — "37 %", "70.2 MB of 190 MB", "12 s elapsed", "about 20 s left" —
 * for the panel's row (from the staging poll) and the status bar (from the event bus).
 */
export function progressParts(
  progress: {
    fraction?: number | null;
    done?: number;
    total?: number;
    elapsed?: number;
    left?: number | null;
  },
  trans: TranslationBundle
): string[] {
  const parts: string[] = [];
  if (progress.fraction !== null && progress.fraction !== undefined) {
    parts.push(trans.__('%1 %', Math.floor(progress.fraction * 100)));
  }
  if (progress.total) {
    parts.push(
      trans.__(
        '%1 of %2',
        formatBytes(progress.done ?? 0),
        formatBytes(progress.total)
      )
    );
  }
  if (progress.elapsed !== undefined) {
    parts.push(trans.__('%1 elapsed', formatDuration(progress.elapsed)));
  }
  if (progress.left !== null && progress.left !== undefined) {
    parts.push(trans.__('about %1 left', formatDuration(progress.left)));
  }
  return parts;
}
