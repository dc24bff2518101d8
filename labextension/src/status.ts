/**
 * The status bar item that shows a kernel start's unpack ("Unpacking Python (demo): 37 % ·
 * about 20 s left"), fed by kernelprov's events on jupyter_server's event bus.
 */
import { Event } from '@jupyterlab/services';
import { TranslationBundle } from '@jupyterlab/translation';
import { ISignal, Signal } from '@lumino/signaling';
import { Widget } from '@lumino/widgets';

import { progressParts } from './state';

/** The event schema kernelprov's provisioner emits (kernelprov/jupyter/events/). */
export const STAGING_SCHEMA = 'https://events.kernelprov.org/staging';

/** One staging event, as kernelprov emits it (kernelprov/jupyter/event_schemas/staging/v1.yaml). */
export interface IStagingEvent {
  action: 'started' | 'progress' | 'finished' | 'failed' | 'queued';
  archive: string;
  /** set for a kernel start; absent for the panel's Stage now */
  kernel_id?: string;
  kernel_name?: string;
  display_name?: string;
  done?: number;
  total?: number;
  fraction?: number | null;
  elapsed?: number;
  eta?: number | null;
  seconds?: number;
  outcome?: 'unpacked' | 'reused';
  message?: string;
}

/** The kernelprov staging event in an event bus emission, or null for any other event. */
export function stagingEvent(emission: Event.Emission): IStagingEvent | null {
  if (!String(emission.schema_id).startsWith(STAGING_SCHEMA)) {
    return null;
  }
  const event = emission as unknown as IStagingEvent;
  if (typeof event.action !== 'string' || typeof event.archive !== 'string') {
    return null;
  }
  return event;
}

/**
 * The status bar item: active while at least one kernel start unpacks.
 */
export class StagingStatus extends Widget {
  constructor(trans: TranslationBundle) {
    super();
    this._trans = trans;
    this.addClass('jp-kernelprov-status');
    this.node.setAttribute('role', 'status');
  }

  /** Whether a kernel start is unpacking (the status bar shows the item only then). */
  get active(): boolean {
    return this._starts.size > 0;
  }

  /** Emitted when `active` may have changed. */
  get changed(): ISignal<this, void> {
    return this._changed;
  }

  /** Take one event. */
  take(event: IStagingEvent): void {
    const key = event.kernel_id ?? `stage:${event.archive}`;
    if (event.action === 'finished' || event.action === 'failed') {
      this._starts.delete(key);
    } else {
      this._starts.set(key, { ...this._starts.get(key), ...event });
    }
    this._render();
    this._changed.emit();
  }

  private _render(): void {
    const trans = this._trans;
    const texts = [...this._starts.values()].map(event => {
      const who = event.display_name ?? event.kernel_name ?? '';
      if (event.action === 'queued') {
        return trans.__('%1: %2', who, event.message ?? '');
      }
      // The elapsed time is the status bar's own business: only what is left is shown.
      const parts = progressParts(
        {
          fraction: event.fraction,
          done: event.done,
          total: event.total,
          left: event.eta
        },
        trans
      );
      return parts.length
        ? trans.__('Unpacking %1: %2', who, parts.join(' · '))
        : trans.__('Unpacking %1…', who);
    });
    this.node.textContent = texts.join(' | ');
    this.node.title = trans.__(
      'kernelprov unpacks the environment onto this node once; later starts reuse it'
    );
  }

  private _changed = new Signal<this, void>(this);
  private _starts = new Map<string, IStagingEvent>();
  private _trans: TranslationBundle;
}
