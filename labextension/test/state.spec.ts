import { env, staged } from './fixtures';
import {
  formatBytes,
  formatDuration,
  packageCount,
  problemText,
  remainingSeconds,
  sortEnvironments,
  stateOf,
  summarize
} from '../src/state';

describe('state', () => {
  it('formats sizes and durations the way the CLI does', () => {
    expect(
      [0, 999, 1000, 123_456, 80_000_000, 12_300_000_000].map(formatBytes)
    ).toEqual(['0 B', '999 B', '1.0 kB', '123 kB', '80.0 MB', '12.3 GB']);
    expect(formatBytes(null)).toBe('—');
    expect([0, 8.4, 60, 125, 3725].map(formatDuration)).toEqual([
      '0 s',
      '8 s',
      '1 min',
      '2 min 5 s',
      '1 h 2 min'
    ]);
  });

  it('estimates the time left only once something is known', () => {
    expect(remainingSeconds(0.01, 10)).toBeNull();
    expect(remainingSeconds(0.5, 1)).toBeNull();
    expect(remainingSeconds(0.25, 10)).toBeCloseTo(30);
  });

  it('names each row state', () => {
    expect(stateOf(env('a'))).toBe('not-staged');
    expect(stateOf(env('a', { staged }))).toBe('ready');
    expect(stateOf(env('a', { staged }), 'evict')).toBe('evicting');
    expect(stateOf(env('a'), 'open')).toBe('starting');
    const staging = {
      done: 1,
      total: 4,
      fraction: 0.25,
      started_at: 1,
      error: null
    };
    expect(stateOf(env('a', { staging }))).toBe('staging');
    expect(stateOf(env('a', { staging: { ...staging, error: 'boom' } }))).toBe(
      'failed'
    );
    expect(
      stateOf(env('a', { last_failure: { message: 'cut short', at: 5 } }))
    ).toBe('failed');
    expect(stateOf(env('a', { problems: ['missing'] }))).toBe('problem');
  });

  it('sorts problem rows first, then by display name', () => {
    const sorted = sortEnvironments([
      env('zeta'),
      env('beta', { display_name: 'beta' }),
      env('omega', { problems: ['The archive does not exist'] }),
      env('Alpha', { display_name: 'Alpha' }),
      env('kappa', { last_failure: { message: 'damaged', at: 1 } })
    ]);
    expect(sorted.map(e => e.name)).toEqual([
      'kappa',
      'omega',
      'Alpha',
      'beta',
      'zeta'
    ]);
  });

  it('explains a problem row with its first sentence, a past failure only while not staged', () => {
    expect(problemText(env('a', { problems: ['one', 'two'] }))).toBe('one');
    const failed = env('a', { last_failure: { message: 'damaged', at: 1 } });
    expect(problemText(failed)).toBe('damaged');
    expect(problemText({ ...failed, staged })).toBeNull();
  });

  it('summarizes the list in one line', () => {
    const staging = {
      done: 1,
      total: 4,
      fraction: 0.25,
      started_at: 1,
      error: null
    };
    expect(
      summarize([
        env('a', { staged }),
        env('b', { staged }),
        env('c', { staged: { ...staged, in_use: 2 } }),
        env('d', { staging }),
        env('e', { problems: ['x'] }),
        env('f', { last_failure: { message: 'y', at: 1 } }),
        env('g')
      ])
    ).toEqual([
      ['in-use', 1],
      ['ready', 2],
      ['staging', 1],
      ['problem', 2],
      ['not-staged', 1]
    ]);
  });

  it('counts conda records and pip distributions together', () => {
    expect(packageCount(env('a'))).toBe(42);
    expect(packageCount(env('a', { pip_packages: null }))).toBe(12);
    expect(
      packageCount(env('a', { packages: null, pip_packages: null }))
    ).toBeNull();
  });
});
