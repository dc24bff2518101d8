import { ServerConnection } from '@jupyterlab/services';
import { IDisposable } from '@lumino/disposable';
import { Poll } from '@lumino/polling';
import { ISignal, Signal } from '@lumino/signaling';

import {
  IEnvironment,
  IEnvironmentList,
  requestAPI,
  stagePath
} from './request';

/** How often the list refreshes while something stages, and otherwise. */
const STAGING_INTERVAL = 500;
const IDLE_INTERVAL = 15 * 1000;

/**
 * The panel's data: the environments the server reports, refreshed by a poll that speeds up
 * while a stage runs and stands by while the panel or the browser tab is hidden.
 */
export class EnvironmentsModel implements IDisposable {
  constructor(serverSettings: ServerConnection.ISettings) {
    this._serverSettings = serverSettings;
    this._poll = new Poll({
      auto: false,
      factory: () => this._fetch(),
      frequency: {
        interval: IDLE_INTERVAL,
        backoff: true,
        max: 4 * IDLE_INTERVAL
      },
      name: 'kernelprov:environments',
      standby: () => (this._visible ? 'when-hidden' : true)
    });
  }

  /** Emitted after every change of `environments`, `error` or `busy`. */
  get changed(): ISignal<this, void> {
    return this._changed;
  }

  get environments(): ReadonlyArray<IEnvironment> {
    return this._environments;
  }

  /** The node-local cache root the server stages into. */
  get cacheDir(): string {
    return this._cacheDir;
  }

  /** Why the last refresh failed, or null. */
  get error(): string | null {
    return this._error;
  }

  /** True until the first answer arrives. */
  get loading(): boolean {
    return this._loading;
  }

  /** The action on `name` that waits for the server, if any. */
  busyWith(name: string): EnvironmentsModel.Action | undefined {
    return this._busy.get(name);
  }

  /** Set by the panel when it is shown or hidden: a hidden panel does not poll. */
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

  /** Refresh now, e.g. after kernelspecs changed. */
  refresh(): Promise<void> {
    return this._poll.refresh();
  }

  /** Start staging `name` on the server's node; progress arrives through the poll. */
  async stage(name: string): Promise<void> {
    await this._act(name, 'stage', { method: 'POST' });
  }

  /** Remove the staged copy of `name`; the server refuses while kernels use it. */
  async evict(name: string): Promise<void> {
    await this._act(name, 'evict', { method: 'DELETE' });
  }

  dispose(): void {
    this._poll.dispose();
    Signal.clearData(this);
  }

  private async _act(
    name: string,
    action: EnvironmentsModel.Action,
    init: RequestInit
  ): Promise<void> {
    this._busy.set(name, action);
    this._changed.emit();
    try {
      const env = await requestAPI<IEnvironment>(
        stagePath(name),
        this._serverSettings,
        init
      );
      this._replace(env);
    } finally {
      this._busy.delete(name);
      this._changed.emit();
      void this.refresh();
    }
  }

  private _replace(env: IEnvironment): void {
    this._environments = this._environments.map(e =>
      e.name === env.name ? env : e
    );
    this._adjustFrequency();
  }

  private async _fetch(): Promise<void> {
    try {
      const list = await requestAPI<IEnvironmentList>(
        'envs',
        this._serverSettings
      );
      this._environments = list.envs;
      this._cacheDir = list.cache_dir;
      this._error = null;
    } catch (reason) {
      this._error = (reason as Error).message;
    }
    this._loading = false;
    this._adjustFrequency();
    this._changed.emit();
  }

  private _adjustFrequency(): void {
    const staging = this._environments.some(
      e => e.staging && !e.staging.error && !e.staged
    );
    this._poll.frequency = staging
      ? { interval: STAGING_INTERVAL, backoff: false, max: STAGING_INTERVAL }
      : { interval: IDLE_INTERVAL, backoff: true, max: 4 * IDLE_INTERVAL };
  }

  private _busy = new Map<string, EnvironmentsModel.Action>();
  private _cacheDir = '';
  private _changed = new Signal<this, void>(this);
  private _environments: IEnvironment[] = [];
  private _error: string | null = null;
  private _loading = true;
  private _poll: Poll;
  private _serverSettings: ServerConnection.ISettings;
  private _visible = false;
}

export namespace EnvironmentsModel {
  /** What a row's buttons ask of the server. */
  export type Action = 'stage' | 'evict';
}
