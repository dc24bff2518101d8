import {
  EnvironmentsModel,
  IDLE_INTERVAL,
  MAX_INTERVAL,
  STAGING_INTERVAL
} from '../src/model';
import {
  IEnvironment,
  IEnvironmentList,
  IEnvironmentsAPI,
  IStagingStates
} from '../src/request';
import { env, staged } from './fixtures';

/** A stand-in for the server extension: answers from `envs`, or fails while `down`. */
class FakeServer implements IEnvironmentsAPI {
  envs: IEnvironment[] = [];
  down = false;
  lists = 0;
  stagingCalls: string[][] = [];
  stagingAnswer: IStagingStates = { envs: {} };

  async list(): Promise<IEnvironmentList> {
    this.lists += 1;
    if (this.down) {
      throw new Error('Failed to fetch');
    }
    return { envs: this.envs, cache_dir: '/tmp' };
  }

  async staging(names: string[]): Promise<IStagingStates> {
    this.stagingCalls.push(names);
    return this.stagingAnswer;
  }

  async stage(name: string): Promise<IEnvironment> {
    return this.envs.find(e => e.name === name) as IEnvironment;
  }

  async evict(name: string): Promise<IEnvironment> {
    return this.envs.find(e => e.name === name) as IEnvironment;
  }
}

const staging = (fraction: number) => ({
  done: fraction * 100,
  total: 100,
  fraction,
  started_at: 1,
  elapsed: 10,
  error: null
});

describe('EnvironmentsModel', () => {
  let server: FakeServer;
  let model: EnvironmentsModel;

  beforeEach(() => {
    jest.useFakeTimers();
    server = new FakeServer();
    model = new EnvironmentsModel(server);
    model.visible = true;
  });

  afterEach(() => {
    model.dispose();
    jest.useRealTimers();
  });

  it('lists problem rows first, then by display name', async () => {
    server.envs = [env('b'), env('a'), env('c', { problems: ['gone'] })];
    await model.start();
    await jest.advanceTimersByTimeAsync(10);
    expect(model.environments.map(e => e.name)).toEqual(['c', 'a', 'b']);
  });

  it('backs off while the server is gone, keeps the rows, and recovers', async () => {
    server.envs = [env('a')];
    await model.start();
    await jest.advanceTimersByTimeAsync(10);
    expect(model.connected).toBe(true);
    server.down = true;
    await jest.advanceTimersByTimeAsync(IDLE_INTERVAL);
    expect(model.connected).toBe(false);
    expect(model.error).toBe('Failed to fetch');
    expect(model.environments.map(e => e.name)).toEqual(['a']); // stale rows stay, greyed
    let waited = IDLE_INTERVAL;
    for (let i = 0; i < 6; i++) {
      const interval = model.pollInterval;
      await jest.advanceTimersByTimeAsync(interval);
      waited += interval;
    }
    expect(model.pollInterval).toBeGreaterThan(IDLE_INTERVAL);
    expect(model.pollInterval).toBeLessThanOrEqual(MAX_INTERVAL);
    expect(server.lists).toBeLessThan(2 + waited / IDLE_INTERVAL); // fewer tries than without backoff
    server.down = false;
    await jest.advanceTimersByTimeAsync(model.pollInterval);
    expect(model.connected).toBe(true);
    expect(model.pollInterval).toBe(IDLE_INTERVAL);
  });

  it('polls only the staging rows fast, and the full list again when a stage ends', async () => {
    server.envs = [env('a', { staging: staging(0.1) }), env('b')];
    const ended: EnvironmentsModel.IStageEnded[] = [];
    model.stageEnded.connect((_, e) => ended.push(e));
    await model.start();
    await jest.advanceTimersByTimeAsync(10);
    expect(model.followingStages).toBe(true);
    const listsBefore = server.lists;
    server.stagingAnswer = {
      envs: { a: { staging: staging(0.5), staged: false } }
    };
    await jest.advanceTimersByTimeAsync(3 * STAGING_INTERVAL + 10);
    expect(server.stagingCalls.length).toBeGreaterThanOrEqual(3);
    expect(server.stagingCalls.every(names => names.join() === 'a')).toBe(true);
    expect(server.lists).toBe(listsBefore); // the full list is not re-read every second
    expect(
      model.environments.find(e => e.name === 'a')?.staging?.fraction
    ).toBe(0.5);

    server.stagingAnswer = { envs: { a: { staging: null, staged: true } } };
    server.envs = [env('a', { staged }), env('b')];
    await jest.advanceTimersByTimeAsync(STAGING_INTERVAL + 10);
    expect(server.lists).toBe(listsBefore + 1);
    expect(ended.map(e => [e.env.name, e.ok])).toEqual([['a', true]]);
    const calls = server.stagingCalls.length;
    await jest.advanceTimersByTimeAsync(5 * STAGING_INTERVAL);
    expect(model.followingStages).toBe(false);
    expect(server.stagingCalls.length).toBeLessThanOrEqual(calls + 1);
  });

  it('reports a stage that failed, with its sentence', async () => {
    server.envs = [env('a', { staging: staging(0.3) })];
    const ended: EnvironmentsModel.IStageEnded[] = [];
    model.stageEnded.connect((_, e) => ended.push(e));
    await model.start();
    await jest.advanceTimersByTimeAsync(10);
    server.stagingAnswer = { envs: { a: { staging: null, staged: false } } };
    server.envs = [
      env('a', { last_failure: { message: 'The archive is damaged.', at: 2 } })
    ];
    await jest.advanceTimersByTimeAsync(STAGING_INTERVAL + 10);
    expect(ended).toEqual([
      { env: server.envs[0], ok: false, message: 'The archive is damaged.' }
    ]);
  });

  it('follows a kernel start reported on the event bus until it is unwatched', async () => {
    server.envs = [env('a')];
    await model.start();
    await jest.advanceTimersByTimeAsync(10);
    expect(model.followingStages).toBe(false);
    model.watch('a');
    server.stagingAnswer = {
      envs: { a: { staging: staging(0.2), staged: false } }
    };
    await jest.advanceTimersByTimeAsync(2 * STAGING_INTERVAL + 10);
    expect(server.stagingCalls[server.stagingCalls.length - 1]).toEqual(['a']);
    expect(model.environments[0].staging?.fraction).toBe(0.2);
  });
});
