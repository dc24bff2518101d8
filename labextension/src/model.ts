import { IDisposable } from '@lumino/disposable';
import { Poll } from '@lumino/polling';
import { ISignal, Signal } from '@lumino/signaling';

import { IEnvironment, IEnvironmentsAPI } from './request';
import { Action, sortEnvironments, stagingNames } from './state';

/** How often the whole list refreshes (it reads kernel dirs on shared storage), and its ceiling. */
export const IDLE_INTERVAL = 15 * 1000;
export const MAX_INTERVAL = 4 * IDLE_INTERVAL;
/** How often the staging state alone refreshes while something stages. */
export const STAGING_INTERVAL = 1000;

/**
 * The panel's data: the environments the server reports.
 *
 * Two polls: the full list every 15 s (backing off to a minute while the server does not answer,
 * standing by while the panel is hidden), and, while something stages, only the staging rows
 * about once a second (`GET /kernelprov/staging`, which reads nothing on shared storage).
 * `stageEnded` tells the plugin when a stage it watched finishes or fails, for a notification.
 */
export class EnvironmentsModel implements IDisposable {
  constructor(api: IEnvironmentsAPI) {
    this._api = api;
    this._poll = new Poll({
      auto: false,
      factory: () => this._fetch(),
      frequency: { interval: IDLE_INTERVAL, backoff: true, max: MAX_INTERVAL },
      name: 'kernelprov:environments',
      standby: () => (this._visible ? 'when-hidden' : true)
    });
    this._stagingPoll = new Poll({
      auto: false,
      factory: () => this._fetchStaging(),
      frequency: {
        interval: STAGING_INTERVAL,
        backoff: true,
        max: 10 * STAGING_INTERVAL
      },
      name: 'kernelprov:staging',
      standby: 'when-hidden'
    });
  }

  /** Emitted after every change of `environments`, `error` or a row's busy state. */
  get changed(): ISignal<this, void> {
    return this._changed;
  }

  /** Emitted when a stage this model saw running has finished (`ok`) or failed. */
  get stageEnded(): ISignal<this, EnvironmentsModel.IStageEnded> {
    return this._stageEnded;
  }

  /** Problem rows first, then by display name. */
  get environments(): ReadonlyArray<IEnvironment> {
    return this._environments;
  }

  /** The node-local cache root the server stages into. */
  get cacheDir(): string {
    return this._cacheDir;
  }

  /** Why the last refresh failed (the server is gone or refuses), or null. */
  get error(): string | null {
    return this._error;
  }

  /** False while the server does not answer: rows stay, greyed, with their buttons disabled. */
  get connected(): boolean {
    return this._error === null;
  }

  /** True until the first answer arrives. */
  get loading(): boolean {
    return this._loading;
  }

  /** Milliseconds until the full poll's next tick: grows while the server does not answer. */
  get pollInterval(): number {
    return this._poll.state.interval;
  }

  /** Whether the fast staging poll runs. */
  get followingStages(): boolean {
    return this._following;
  }

  /** The action on `name` that waits for the server, if any. */
  busyWith(name: string): Action | undefined {
    return this._busy.get(name);
  }

  /** Set by the panel when it is shown or hidden: a hidden panel does not poll the full list. */
  set visible(visible: boolean) {
    this._visible = visible;
    if (visible) {
      void this.refresh();
    }
  }

  get isDisposed(): boolean {
    return this._poll.isDisposed;
  }

  /** Start polling (called once the panel is in the shell). */
  start(): Promise<void> {
    return this._poll.start();
  }

  /** Refresh the full list now, e.g. after kernelspecs changed or a kernel start began. */
  refresh(): Promise<void> {
    return this._poll.refresh();
  }

  /**
   * Follow `name`'s staging closely until `unwatch(name)`: called for kernel starts the event bus
   * reports (notebooks opened anywhere), whose unpack may not have begun yet.
   */
  watch(name: string): void {
    this._watched.add(name);
    this._follow(true);
  }

  unwatch(name: string): void {
    this._watched.delete(name);
    void this.refresh();
  }

  /** Start staging `name` on the server's node; progress arrives through the fast poll. */
  async stage(name: string): Promise<void> {
    await this.run(name, 'stage', () => this._api.stage(name));
  }

  /** Remove the staged copy of `name`; the server refuses while kernels use it. */
  async evict(name: string): Promise<void> {
    await this.run(name, 'evict', () => this._api.evict(name));
  }

  /**
   * Mark `name` busy with `action` while `work` runs (the plugin's kernel starts and shutdowns
   * too), take the environment it returns, and refresh afterwards.
   */
  async run<T>(
    name: string,
    action: Action,
    work: () => Promise<T>
  ): Promise<T> {
    this._busy.set(name, action);
    this._changed.emit();
    if (action === 'open') {
      this.watch(name); // a start may unpack: show its progress in the row
    }
    try {
      const result = await work();
      if (isEnvironment(result)) {
        this._replace(result);
      }
      return result;
    } finally {
      this._busy.delete(name);
      if (action === 'open') {
        this._watched.delete(name);
      }
      this._changed.emit();
      void this.refresh();
    }
  }

  dispose(): void {
    this._poll.dispose();
    this._stagingPoll.dispose();
    Signal.clearData(this);
  }

  private _replace(env: IEnvironment): void {
    this._setEnvironments(
      this._environments.map(e => (e.name === env.name ? env : e))
    );
  }

  /** Take a new list, noticing stages that ended since the last one. */
  private _setEnvironments(envs: IEnvironment[]): void {
    for (const env of envs) {
      const before = this._environments.find(e => e.name === env.name);
      const wasStaging =
        before?.staging && !before.staging.error && !before.staged;
      if (!wasStaging || (env.staging && !env.staging.error && !env.staged)) {
        continue;
      }
      const message = env.staging?.error ?? env.last_failure?.message ?? null;
      if (env.staged) {
        this._stageEnded.emit({ env, ok: true, message: null });
      } else if (message) {
        this._stageEnded.emit({ env, ok: false, message });
      }
    }
    this._environments = sortEnvironments(envs);
    this._follow(this._followed().length > 0);
  }

  private async _fetch(): Promise<void> {
    try {
      const list = await this._api.list();
      this._setEnvironments(list.envs);
      this._cacheDir = list.cache_dir;
      this._error = null;
    } catch (reason) {
      this._error = (reason as Error).message || String(reason);
      throw reason; // so that the poll backs off
    } finally {
      this._loading = false;
      this._changed.emit();
    }
  }

  private async _fetchStaging(): Promise<void> {
    const names = this._followed();
    if (!names.length) {
      this._follow(false);
      return;
    }
    const states = (await this._api.staging(names)).envs;
    let ended = false;
    const envs = this._environments.map(env => {
      const state = states[env.name];
      if (!state) {
        return env;
      }
      const wasStaging = env.staging && !env.staging.error && !env.staged;
      if (
        wasStaging &&
        (state.staged || !state.staging || state.staging.error)
      ) {
        ended = true; // the full description (size, path, failure) comes with the next refresh
      }
      const merged =
        state.slurm_jobs !== undefined
          ? { ...env, slurm_jobs: state.slurm_jobs }
          : env;
      return state.staging ? { ...merged, staging: state.staging } : merged;
    });
    this._environments = envs;
    this._changed.emit();
    if (ended) {
      await this.refresh();
    }
  }

  /** The rows the fast poll asks about: those staging, and kernel starts being watched. */
  private _followed(): string[] {
    const names = new Set(stagingNames(this._environments));
    for (const name of this._watched) {
      names.add(name);
    }
    return [...names];
  }

  private _follow(on: boolean): void {
    if (on === this._following) {
      return;
    }
    this._following = on;
    if (on) {
      void this._stagingPoll.start();
    } else {
      void this._stagingPoll.stop();
    }
  }

  private _api: IEnvironmentsAPI;
  private _busy = new Map<string, Action>();
  private _cacheDir = '';
  private _changed = new Signal<this, void>(this);
  private _environments: IEnvironment[] = [];
  private _error: string | null = null;
  private _following = false;
  private _loading = true;
  private _poll: Poll;
  private _stageEnded = new Signal<this, EnvironmentsModel.IStageEnded>(this);
  private _stagingPoll: Poll;
  private _visible = false;
  private _watched = new Set<string>();
}

function isEnvironment(value: unknown): value is IEnvironment {
  return (
    typeof value === 'object' &&
    value !== null &&
    'name' in value &&
    'problems' in value
  );
}

export namespace EnvironmentsModel {
  /** A stage that ended: `ok`, or failed with `message`. */
  export interface IStageEnded {
    env: IEnvironment;
    ok: boolean;
    message: string | null;
  }
}
